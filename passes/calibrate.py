"""Observe the activations that static quantization will need (no graph change).

Runs the still-float model over the calibration feeds (``qcompiler.calibration``) and stores a
``TensorStats`` on each observed activation value (``value.meta[STATS_KEY]``). Which values:
those the placement rules (``passes.activation_points``) will quantize — the activation input of
every annotated target, plus residual-add and pooling inputs — each observed once however many
readers share it (q/k/v projections read one tensor).
"""

from __future__ import annotations

import onnx_ir as ir

from passes.activation_points import points
from qcompiler.calibration import FeedSource, collect_stats
from qcompiler.config import CalibrationConfig

STATS_KEY = "qcompile.stats"


def activations_to_observe(model: ir.Model, placement: str = "fusable") -> list[ir.Value]:
    """Activations at the placement's points without statistics yet, each once, in order."""
    seen: dict[int, ir.Value] = {}
    for point in points(model, placement):
        if STATS_KEY not in point.value.meta:
            seen.setdefault(id(point.value), point.value)
    return list(seen.values())


def channel_axes(model: ir.Model, placement: str = "fusable") -> dict[str, int]:
    """The channel axis of each observed activation: 1 for a Conv input or any other rank-4
    (NCHW) value, else the last."""
    axes = {}
    for point in points(model, placement):
        shape = point.value.shape
        nchw = point.node.op_type == "Conv" or (shape is not None and len(shape) == 4)
        axes[point.value.name] = 1 if nchw else -1
    return axes


class CalibratePass(ir.passes.InPlacePass):
    """Collect statistics for the activations at the placement's points from ``feeds()``.

    ``feeds``: a callable returning a fresh iterable of input feeds (called once, only if
    something is left to observe). The graph is not changed, so ``modified`` is always false.
    """

    def __init__(
        self,
        feeds: FeedSource,
        config: CalibrationConfig = CalibrationConfig(),
        progress: bool = True,
        placement: str = "fusable",
    ) -> None:
        super().__init__()
        self.feeds = feeds
        self.placement = placement
        self.config = config
        self.progress = progress
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = activations_to_observe(model, self.placement)
        if values:
            stats = collect_stats(
                model,
                values,
                self.feeds(),
                channel_axes=channel_axes(model, self.placement),
                mask_padding=self.config.mask_padding,
                max_samples=self.config.max_samples,
                progress=self.progress,
            )
            for value in values:
                value.meta[STATS_KEY] = stats[value.name]
        self.summary = f"observed {len(values)} activations"
        return ir.passes.PassResult(model, modified=False)
