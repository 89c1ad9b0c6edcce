"""Remove what the rewrites left unused (float weights, replaced ops), name every value and
sort the graph. Built from onnx_ir's common passes."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common


class CleanupPass(ir.passes.Sequential):
    """Dead nodes and initializers go; unnamed values get names; topological order."""

    def __init__(self) -> None:
        super().__init__(
            common.RemoveUnusedNodesPass(),
            common.NameFixPass(),
            common.TopologicalSortPass(),
        )
