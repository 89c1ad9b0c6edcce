"""Put the bias of each quantized linear op on the accumulator's grid as int32.

For ``y = W x + b`` with ``x ≈ s_x (x^q − z_x)`` and ``W ≈ s_w W^q`` (seed 004)::

    b^q = round(b / (s_x s_w))   (int32, one per output channel)
    y ≈ s_x s_w · (Σ_k (x^q_k − z_x) W^q_k + b^q)

The float bias is replaced by ``DequantizeLinear(b^q, s_x·s_w, axis=0)`` — the standard QDQ
form of an int32 bias — so the integer kernels (``QLinearConv``'s ``B``; ``MatMulIntegerToFloat``,
where the lowering also folds ``−z_x·ΣW^q`` into it) take it as is. Which biases: Conv's and
Gemm's third input (Gemm's ``beta`` folded in and reset to 1), and the constant of an ``Add``
that alone reads a MatMul's output. Both the activation and the weight must already come from
DequantizeLinear (per-tensor activation, per-channel or per-tensor weight).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.bias_correction import bias_slot
from passes.integer_ops import weight_refusal
from qcompiler import ir_utils
from qcompiler import quant_math as qm


def dequantize_inputs(node: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """The activation's and the weight's DequantizeLinear nodes, when both are quantized as the
    integer kernels need: per-tensor activation, constant int8 weight."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    x_dq, w_dq = node.inputs[0].producer(), node.inputs[1].producer()
    if x_dq is None or w_dq is None:
        return None
    if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    x_scale = ir_utils.constant_array(x_dq.inputs[1])
    w_q = ir_utils.constant_array(w_dq.inputs[0])
    if x_scale is None or x_scale.size != 1 or w_q is None or w_q.dtype != np.int8:
        return None
    trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    output_axis = 0 if node.op_type == "Conv" or trans_b else 1
    if w_q.ndim < 2 or weight_refusal(node.inputs[1], output_axis) is not None:
        return None
    return x_dq, w_dq


class PrecomputeBiasPass(ir.passes.InPlacePass):
    """Replace the float bias of every DQ-fed Conv/Gemm/MatMul(+Add) by int32 ``b^q`` behind a
    DequantizeLinear (module docstring). Idempotent: an int32 bias is left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in tuple(model.graph):
            if node.domain == "" and node.op_type in ("Conv", "Gemm", "MatMul"):
                count += self._try_precompute(model.graph, node)
        self.summary = f"{count} biases as int32" if count else ""
        return ir.passes.PassResult(model, modified=bool(count))

    @staticmethod
    def _try_precompute(graph: ir.Graph, node: ir.Node) -> bool:
        dq = dequantize_inputs(node)
        slot = bias_slot(node)
        if dq is None or slot is None:
            return False
        x_dq, w_dq = dq
        holder, index = slot
        bias = ir_utils.constant_array(holder.inputs[index])
        if bias is None or bias.dtype != np.float32:
            return False
        w_scale = ir_utils.constant_array(w_dq.inputs[1]).astype(np.float32)
        w_shape = ir_utils.constant_array(w_dq.inputs[0]).shape
        channels = w_shape[0 if node.op_type == "Conv" else -1]
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                return False
            if node.attributes.get_int("transB", 0):
                channels = w_shape[0]
            bias = bias * np.float32(node.attributes.get_float("beta", 1.0))
            w_scale = w_scale * np.float32(node.attributes.get_float("alpha", 1.0))
        if bias.size not in (1, channels) or bias.ndim > 1 and node.op_type != "Gemm":
            return False
        bias = np.broadcast_to(bias.reshape(-1), (channels,))
        x_scale = ir_utils.constant_array(x_dq.inputs[1]).reshape(())
        grid = (np.float32(x_scale) * np.broadcast_to(w_scale.reshape(-1), (channels,))).astype(
            np.float32
        )
        try:
            bias_q = qm.bias_to_int32(bias, x_scale, grid / x_scale)
        except OverflowError:
            return False  # keep the float bias; the op stays as it is
        b = ir_utils.NodeBuilder(graph, holder, node.name or "linear")
        dequantized = b.op(
            "DequantizeLinear",
            [b.const("bias_q", bias_q), b.const("bias_scale", grid), b.const("bias_zero", np.zeros(channels, np.int32))],
            "bias",
            axis=0,
        )
        dequantized.type, dequantized.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([channels])
        holder.replace_input_with(index, dequantized)
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return True
