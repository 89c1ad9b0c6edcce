"""Bring an exported graph to the form the quantization passes expect.

Constant nodes become initializers (weights are then found one way), Identity nodes go, unused
nodes go, and nodes are sorted topologically so that "graph order" means "dataflow order" for
the passes that follow. Built from onnx_ir's common passes.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common


class CanonicalizePass(ir.passes.Sequential):
    """Constants → initializers, no Identity, no dead nodes, topological order."""

    def __init__(self) -> None:
        super().__init__(
            common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.TopologicalSortPass(),
        )
