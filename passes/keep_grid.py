"""Keep weights that already lie on a low-bit grid exactly on that grid.

Checkpoints often come from a pre-quantized source: a GGUF file (SmolLM2-135M ships as Q4_1:
``W = d·q + m`` per block of 32 inputs, ``q`` in 0..15, fp16 ``d`` and ``m``) or
quantization-aware training. Re-quantizing such a weight onto another grid adds a second
rounding error to the first; recognising its grid (``qcompiler.grid.detect_grid``) and storing
``q``, ``d`` and ``m`` loses nothing. The kept weight gets a ``PackedWeight`` (method ``grid``)
in ``node.meta[WEIGHT_KEY]``; the methods that follow skip it.

A grid wider than the recipe's bits is kept too (up to 8 bits): the source chose it, usually for
its most sensitive tensor (llama.cpp stores SmolLM2's tied embedding/LM head as Q8_0), and
re-rounding it to 4 bits costs far more than its bytes (SmolLM2: perplexity ×1.19 instead of
×1.00). ``--no-keep-grid`` re-quantizes everything to the requested width.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from passes.select_targets import targets
from qcompiler import grid, ir_utils
from qcompiler.packed_weight import WEIGHT_KEY, PackedWeight

GRID_BITS = (2, 3, 4, 8)  # the widths the emitters store (8: int8 grids)
GRID_BLOCKS = (128, 64, 32)


def packed_from_grid(match: grid.GridMatch) -> PackedWeight:
    """Affine form when ``-m/d`` is an integer in range (Q4_0-like grids), else offset form."""
    zero = match.zero_point
    if zero is not None and zero.min() >= 0 and zero.max() < (1 << match.bits):
        return PackedWeight(match.bits, match.group_size, match.q, "grid",
                            scale=match.scale, zero_point=zero.astype(np.uint8))
    return PackedWeight(match.bits, match.group_size, match.q, "grid", scale=match.scale, offset=match.offset)


class KeepGridPass(ir.passes.InPlacePass):
    """Detect the grid of each MatMul weight (at most ``max(bits, 8)`` bits) and keep it.

    ``kept``: ``{node name: "4-bit, blocks of 32"}`` for the report.
    """

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = max(bits, 8)
        self.kept: dict[str, str] = {}
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.kept = {}
        widths = tuple(b for b in GRID_BITS if b <= self.bits)
        for target in targets(model):
            if target.op_type != "MatMul" or target.channel_axis != 1 or WEIGHT_KEY in target.node.meta:
                continue
            match = grid.detect_grid(target.weight, GRID_BLOCKS, widths)
            ir_utils.release_array_pages(target.weight)  # one float weight resident at a time
            if match is None:
                continue
            target.node.meta[WEIGHT_KEY] = packed_from_grid(match)
            self.kept[target.node.name] = f"{match.bits}-bit, blocks of {match.group_size}"
        kinds = collections.Counter(self.kept.values())
        self.summary = (f"{len(self.kept)} weights kept on their grid (" + ", ".join(
            f"{n}× {kind}" for kind, n in sorted(kinds.items())) + ")") if self.kept else "no weight on a grid"
        # Only annotations: the graph changes when the weights are emitted.
        return ir.passes.PassResult(model, modified=False)
