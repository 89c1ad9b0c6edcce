"""AWQ: activation-aware per-channel scales folded upstream, clipping searched, then RTN.

For the layers reading one activation ``X`` (a group, as in SmoothQuant)::

    X W_i = (X diag(s)⁻¹) (diag(s) W_i),      s_j = mean|X_j|^α (normalised; qcompiler.awq)

``α`` is searched on sampled calibration rows for the group's stacked weights (the layer output
error with RTN weights), ``1/s`` is folded into the op producing ``X`` by SmoothQuant's
absorbers (norm γ/β, or a preceding linear layer through a channel-wise path), and each weight
``diag(s) W_i`` is then quantized with a clipping ratio searched per group and output column.
The LM head is left to ``QuantizeWeightOnlyPass`` when ``lm_head_bits`` differs from the
recipe's bits. A group without an exact absorber is not scaled (an explicit Mul would cost time at every
run) but still gets the clipping search; so is a group containing a weight already decided
(kept on its grid: rescaling would move it off its grid), or whose absorbing linear layer is.

Two phases, so that scaling a linear absorber's columns never touches an already quantized
weight: every group's ``s`` is chosen and folded first (all on the float model's rows), then
every layer is clipped and quantized on its rows divided by its ``s``.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import onnx_ir as ir

from passes.quantize_weight_only import is_lm_head
from passes.smoothquant import Group, LinearProducer, groups, resolve_linear_absorbers, scale_weight
from qcompiler import awq
from qcompiler import quant_math as qm
from qcompiler.calibration import FeedSource, collect_stats
from qcompiler.config import CalibrationConfig
from qcompiler.packed_weight import WEIGHT_KEY, PackedWeight
from qcompiler.smoothing import tied_max

ROW_SAMPLE = 512  # calibration rows per activation for both searches


class AWQPass(ir.passes.InPlacePass):
    """Scale (where an absorber exists), clip and quantize every undecided MatMul weight.

    ``quantize=False``: phase 1 only (scales chosen and folded); the weights stay float and
    undecided for the next pass (``awq-gptq``: GPTQ on the scaled model)."""

    def __init__(
        self,
        feeds: FeedSource,
        fmt: qm.WeightFormat,
        calibration: CalibrationConfig = CalibrationConfig(),
        progress: bool = True,
        lm_head_bits: int | None = None,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        self.feeds, self.fmt, self.calibration, self.progress = feeds, fmt, calibration, progress
        self.lm_head_bits, self.quantize = lm_head_bits, quantize
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = [g for g in groups(model) if all(t.op_type == "MatMul" and t.channel_axis == 1 for t in g.targets)]
        if self.lm_head_bits not in (None, self.fmt.bits):  # the head is quantized apart, at its bits
            for g in found:
                g.targets = [t for t in g.targets if not is_lm_head(t.node)]
        found = [g for g in found if g.targets and any(WEIGHT_KEY not in t.node.meta for t in g.targets)]
        if not found:
            self.summary = "nothing to quantize"
            return ir.passes.PassResult(model, modified=False)
        feeds = list(itertools.islice(self.feeds(), self.calibration.max_samples))
        stats = collect_stats(model, [g.activation for g in found], feeds, mask_padding=self.calibration.mask_padding,
                              progress=self.progress, keep_rows=ROW_SAMPLE, histogram=False)
        resolve_linear_absorbers(model, found, feeds[0])
        outcomes: collections.Counter = collections.Counter()
        scales = {}
        for group in found:  # phase 1: choose and fold every s
            rows = stats[group.activation.name].rows.sample
            scales[id(group)], outcome = self._scale(model.graph, group, rows)
            outcomes[outcome] += 1
        for group in (found if self.quantize else ()):  # phase 2: clip and quantize on X/s
            rows = stats[group.activation.name].rows.sample / scales[id(group)]
            for target in group.targets:
                if WEIGHT_KEY not in target.node.meta:
                    clipped = awq.search_clipping(rows, target.weight, self.fmt)
                    target.node.meta[WEIGHT_KEY] = PackedWeight.from_quantized(clipped, self.fmt.bits, "awq")
        self.summary = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
        return ir.passes.PassResult(model, modified=outcomes["scaled"] > 0)

    def _scale(self, graph: ir.Graph, group: Group, rows: np.ndarray) -> tuple[np.ndarray, str]:
        ones = np.ones(rows.shape[1], np.float32)
        if group.absorber is None:
            return ones, "not scaled (no absorber)"
        if any(WEIGHT_KEY in t.node.meta for t in group.targets):
            return ones, "not scaled (a weight kept on its grid)"
        if isinstance(group.absorber, LinearProducer) and WEIGHT_KEY in group.absorber.node.meta:
            return ones, "not scaled (the absorbing layer is kept on its grid)"
        choice = awq.search_scales(rows, group.stacked_weight(), self.fmt)
        s = choice.scales
        tied = group.absorber.tied
        if tied is not None:  # channels copied from one source share its scale
            s = tied_max(s, tied)[tied].astype(np.float32)
        if choice.alpha == 0.0 or np.all(s == 1.0):
            return ones, "not scaled (α = 0)"
        group.absorber.apply(s)
        for target in group.targets:
            scale_weight(graph, target, s)
        return s, "scaled"
