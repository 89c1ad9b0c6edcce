"""Quantize the weights of annotated targets to int8 and feed them through DequantizeLinear.

For a target with weight ``W`` (as the op sees it) and output-channel axis ``a``::

    s_c = max_k |W[c, k]| / 127        W^q = clip(round(W / s_c), -127, 127)   (z = 0)

The op's weight input becomes ``DequantizeLinear(W^q, s, 0, axis=a)`` reading new int8 and
float32 initializers. A weight reached through a Transpose/Reshape is stored already viewed, so
the DequantizeLinear feeds the op directly (the pattern ONNX Runtime and TensorRT fuse); the
float source is dropped by clean-up unless something else (an embedding Gather) still reads it.
The symmetric range is ``[-127, 127]``: ``-128`` is never produced, so ``-W^q`` is representable
and int8×int8 products cannot overflow int16 pairs on any kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.select_targets import TARGET_KEY, QuantTarget
from qcompiler import ir_utils
from qcompiler import quant_math as qm

WEIGHT_KEY = "qcompile.weight"
# Symmetric int8 over [-127, 127] (see the module docstring).
INT8_SYMMETRIC = qm.IntType(8, signed=True)


def quantize_weight(weight: np.ndarray, channel_axis: int) -> qm.QuantizedTensor:
    """Per-output-channel symmetric int8 on ``[-127, 127]``."""
    block = qm.PerAxis(channel_axis).block_size(weight.shape)
    amax = qm.block_reduce(np.abs(weight), block, np.maximum)
    scale = qm.symmetric_scale(amax, INT8_SYMMETRIC)  # amax / 127
    q = qm.quantize(weight, scale, 0, INT8_SYMMETRIC, block)
    return qm.QuantizedTensor(q, scale, np.zeros_like(scale, np.int8), block)


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
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _quantize(graph: ir.Graph, target: QuantTarget) -> qm.QuantizedTensor:
        node = target.node
        quantized = quantize_weight(target.weight, target.channel_axis)
        stem = node.name or node.outputs[0].name or "weight"
        q = ir_utils.initializer(graph, f"{stem}.weight_q", quantized.q)
        scale = ir_utils.initializer(graph, f"{stem}.weight_scale", quantized.scale.reshape(-1))
        zero = ir_utils.initializer(graph, f"{stem}.weight_zero", quantized.zero_point.reshape(-1))
        dq = ir.node(
            "DequantizeLinear",
            [q, scale, zero],
            attributes={"axis": target.channel_axis},
            name=ir_utils.unique_name(graph, f"{stem}.weight_dq"),
        )
        dq.outputs[0].name = ir_utils.unique_name(graph, f"{stem}.weight_dequantized")
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dq.outputs[0].shape = ir.Shape(target.weight.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        return quantized
