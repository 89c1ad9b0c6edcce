"""Static activation quantization: QuantizeLinear→DequantizeLinear at each placement point.

The points (``passes.activation_points``) are the activation input of every weight-quantized
target, plus residual-add and pooling inputs by the placement's rules. Each activation value
gets one uint8 per-tensor pair from its calibrated range
``[lo, hi]`` (widened to contain 0)::

    s = (hi − lo) / 255        z = round(−lo / s)        x̂ = s · (clip(round(x/s) + z, 0, 255) − z)

uint8 activations with int8 per-channel weights is the combination ONNX Runtime's CPU provider
lowers to QLinearMatMul/QLinearConv (int8 activations leave 1×1 convs in float). One Q/DQ pair
per activation value serves all the points reading it (built just before the first of them in
graph order); other readers keep the float value.

An activation SmoothQuant rescaled (``SMOOTHED_ACTIVATION_KEY``) takes its min-max range
whatever the method: smoothing has already evened its channels, and the spikes left are
signal (SmolLM2 static W8A8 + SmoothQuant: perplexity ×1.154 with mse ranges, ×1.100 min-max).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.activation_points import Point, points
from passes.calibrate import STATS_KEY
from passes.quantize_weights import WEIGHT_KEY
from passes.select_targets import TARGET_KEY
from qcompiler import ir_utils
from qcompiler import quant_math as qm
from qcompiler.config import CalibrationConfig
from qcompiler.errors import QCompileError
from qcompiler.ranges import select_range

ACTIVATION_KEY = "qcompile.activation"
SMOOTHED_ACTIVATION_KEY = "qcompile.smoothed_activation"


class InsertStaticQDQPass(ir.passes.InPlacePass):
    """Insert calibrated uint8 Q/DQ at every point of ``placement`` (``"fusable"``: ONNX
    Runtime's integer kernels; ``"all"``: TensorRT's rules). Idempotent: a point already
    reading a DequantizeLinear is skipped."""

    def __init__(
        self, config: CalibrationConfig = CalibrationConfig(), placement: str = "fusable"
    ) -> None:
        super().__init__()
        self.config = config
        self.placement = placement

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        dequantized: dict[int, ir.Value] = {}
        for point in points(model, self.placement):
            node = point.node
            if TARGET_KEY in node.meta and WEIGHT_KEY not in node.meta:
                continue  # a target left in float (its weight was not quantized)
            producer = point.value.producer()
            if producer is not None and producer.op_type == "DequantizeLinear":
                continue
            key = id(point.value)
            if key not in dequantized:
                dequantized[key] = self._insert_qdq(graph, point)
            node.replace_input_with(point.index, dequantized[key])
            if TARGET_KEY in node.meta:
                node.meta[ACTIVATION_KEY] = "static"
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _insert_qdq(self, graph: ir.Graph, point: Point) -> ir.Value:
        x = point.value
        stats = x.meta.get(STATS_KEY)
        if stats is None:
            raise QCompileError(f"no calibration statistics for activation {x.name!r}")
        method = "minmax" if SMOOTHED_ACTIVATION_KEY in x.meta else self.config.method
        rng = select_range(stats, method, percentile=self.config.percentile)
        scale, zero = qm.affine_params(np.float32(rng.lo), np.float32(rng.hi), qm.UINT8)
        b = ir_utils.NodeBuilder(graph, point.node, x.name or "activation")
        s = b.const("scale", np.asarray(scale, np.float32))
        z = b.const("zero_point", np.asarray(zero, np.uint8))
        q = b.op("QuantizeLinear", [x, s, z], "quantized")
        dq = b.op("DequantizeLinear", [q, s, z], "dequantized")
        q.type, q.shape = ir.TensorType(ir.DataType.UINT8), x.shape
        dq.type, dq.shape = ir.TensorType(ir.DataType.FLOAT), x.shape
        return dq
