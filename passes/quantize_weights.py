"""Quantize the weights of annotated targets to int8 and feed them through DequantizeLinear.

For a target with weight ``W`` (as the op sees it) and output-channel axis ``a``::

    s_c = max_k |W[c, k]| / 127        W^q = clip(round(W / s_c), -127, 127)   (z = 0)

The op's weight input becomes ``DequantizeLinear(W^q, s, 0, axis=a)`` reading new int8 and
float32 initializers. A weight reached through a Transpose/Reshape is stored already viewed, so
the DequantizeLinear feeds the op directly (the pattern ONNX Runtime and TensorRT fuse); the
float source is dropped by clean-up unless something else (an embedding Gather) still reads it.
With ``s_c = max|W| / 127`` every ``|W / s_c| ≤ 127``, so ``-128`` is never produced: ``-W^q``
is representable and int8×int8 products cannot overflow int16 pairs on any kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.select_targets import TARGET_KEY, QuantTarget
from qcompiler import ir_utils
from qcompiler import quant_math as qm

WEIGHT_KEY = "qcompile.weight"


def quantize_weight(weight: np.ndarray, channel_axis: int) -> qm.QuantizedTensor:
    """The weight policy: int8, symmetric, one scale per output channel."""
    return qm.quantize_tensor(weight, qm.PerAxis(channel_axis), qm.INT8, symmetric=True)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace each annotated target's float weight by int8 + per-channel DequantizeLinear.

    Idempotent: a target whose weight already comes from our DequantizeLinear is skipped.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for node in tuple(graph):
            target: QuantTarget | None = node.meta.get(TARGET_KEY)
            if target is None or WEIGHT_KEY in node.meta:
                continue
            node.meta[WEIGHT_KEY] = self._quantize(graph, target)
            ir_utils.release_array_pages(target.weight)  # one float weight resident at a time
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _quantize(graph: ir.Graph, target: QuantTarget) -> qm.QuantizedTensor:
        node = target.node
        quantized = quantize_weight(target.weight, target.channel_axis)
        b = ir_utils.NodeBuilder(graph, node, node.name or node.outputs[0].name or "weight")
        dq = b.op(
            "DequantizeLinear",
            [b.const("weight_q", quantized.q), b.const("weight_scale", quantized.scale.reshape(-1)),
             b.const("weight_zero", quantized.zero_point.reshape(-1))],
            "weight_dequantized",
            axis=target.channel_axis,
        )
        dq.type, dq.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(target.weight.shape)
        node.replace_input_with(1, dq)
        return quantized
