"""Observe the activations that static quantization will need (no graph change).

Runs the still-float model over the calibration feeds (``qcompiler.calibration``) and stores a
``TensorStats`` on each observed activation value (``value.meta[STATS_KEY]``). Which values:
the activation input of every annotated target, each observed once however many targets share
it (q/k/v projections read one tensor).
"""

from __future__ import annotations

import onnx_ir as ir

from passes.select_targets import targets
from qcompiler.calibration import FeedSource, collect_stats
from qcompiler.config import CalibrationConfig

STATS_KEY = "qcompile.stats"


def activations_to_observe(model: ir.Model) -> list[ir.Value]:
    """Target activations without statistics yet, each once, in graph order."""
    seen: dict[int, ir.Value] = {}
    for target in targets(model):
        value = target.activation
        if STATS_KEY not in value.meta:
            seen.setdefault(id(value), value)
    return list(seen.values())


def channel_axes(model: ir.Model) -> dict[str, int]:
    """The channel axis of each target activation: 1 for a Conv input (NCHW), else the last."""
    return {t.activation.name: 1 if t.op_type == "Conv" else -1 for t in targets(model)}


class CalibratePass(ir.passes.InPlacePass):
    """Collect statistics for the target activations from ``feeds()``.

    ``feeds``: a callable returning a fresh iterable of input feeds (called once, only if
    something is left to observe). The graph is not changed, so ``modified`` is always false.
    """

    def __init__(
        self,
        feeds: FeedSource,
        config: CalibrationConfig = CalibrationConfig(),
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.feeds = feeds
        self.config = config
        self.progress = progress
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = activations_to_observe(model)
        if values:
            stats = collect_stats(
                model,
                values,
                self.feeds(),
                channel_axes=channel_axes(model),
                mask_padding=self.config.mask_padding,
                max_samples=self.config.max_samples,
                progress=self.progress,
            )
            for value in values:
                value.meta[STATS_KEY] = stats[value.name]
        self.summary = f"observed {len(values)} activations"
        return ir.passes.PassResult(model, modified=False)
