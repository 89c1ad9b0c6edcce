"""fp8 Q/DQ MatMuls → ``com.microsoft.GemmFloat8`` for ONNX Runtime's CUDA provider (Hopper).

ONNX Runtime's CUDA provider runs a float8 ``DQ → MatMul`` by dequantizing, slower than fp16
(measured on an H100). Its ``GemmFloat8`` calls cuBLASLt's FP8 matmul, which accepts only the
"TN" layout: ``transA = 0``, ``transB = 1`` (``GemmFloat8`` with ``transA = transB = 0`` fails
on an H100). So for ``y = x W`` with ``W: [K, N]`` the weight is stored transposed,
``W^T: [N, K]`` in E4M3, and::

    x [..., K] → QuantizeLinear(s_x) → Reshape [M, K] ─┐
                                       W^T_q [N, K] ───┼→ GemmFloat8(transB=1, scaleA=s_x,
                                                       │              scaleB=s_w) → [M, N]
                                   → Reshape [..., N]  ┘

``Y = (s_x A)(s_w B)^T``: the same numbers as the Q/DQ form. cuBLASLt's FP8 path takes one
scale per operand, so the weights must be per-tensor (``FP8Config`` enforces it for
``--target ort-cuda``). Only ``MatMul`` with a rank-2 fp8 weight and per-tensor scales is
rewritten; anything else keeps its portable Q/DQ. The output cannot run on the CPU provider
(no ``GemmFloat8`` kernel) and its timing on an H100 is owed (``bench/fp8_kv.py``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler import ir_utils

MS_DOMAIN = "com.microsoft"


def _match(node: ir.Node):
    """``(x, s_x, W_q, s_w)`` of ``MatMul(DQ(Q(x, s_x)), DQ(W_q, s_w))`` with float8 values and
    scalar scales, or None."""
    if node.op_type != "MatMul" or node.domain != "":
        return None
    a, b = (v.producer() for v in node.inputs)
    if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
        return None
    q = a.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or len(q.inputs) < 3:
        return None
    w_q = ir_utils.constant_array(b.inputs[0])
    s_x, s_w = ir_utils.constant_array(q.inputs[1]), ir_utils.constant_array(b.inputs[1])
    if w_q is None or s_x is None or s_w is None or w_q.ndim != 2 or s_x.size != 1 or s_w.size != 1:
        return None
    if b.inputs[0].const_value.dtype != ir.DataType.FLOAT8E4M3FN:
        return None
    if a.inputs[1] is not q.inputs[1]:
        return None
    return q, w_q, s_w


class EmitGemmFloat8Pass(ir.passes.InPlacePass):
    """Rewrite fp8 Q/DQ MatMuls as ``GemmFloat8`` (TN layout, float output).

    Idempotent: once rewritten, no ``MatMul`` reads the fp8 pattern any more."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, count = model.graph, 0
        for node in tuple(graph):
            found = _match(node)
            if found is None:
                continue
            self._rewrite(graph, node, *found)
            count += 1
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        self.summary = f"{count} MatMul → GemmFloat8"
        return ir.passes.PassResult(model, modified=bool(count))

    @staticmethod
    def _rewrite(graph: ir.Graph, node: ir.Node, q: ir.Node, w_q: np.ndarray, s_w: np.ndarray) -> None:
        k, n = w_q.shape
        b = ir_utils.NodeBuilder(graph, node, node.name or "matmul")
        x_fp8 = q.outputs[0]
        rows = b.op("Reshape", [x_fp8, b.const("rows_shape", np.array([-1, k], np.int64))], "fp8_rows")
        w_t = b.const("weight_fp8_t", np.ascontiguousarray(w_q.T))
        s_x = q.inputs[1]
        s_b = b.const("weight_scale", np.asarray(s_w, np.float32).reshape(()))
        y = b.op("GemmFloat8", [rows, w_t, None, s_x, s_b], "gemm_fp8", domain=MS_DOMAIN,
                 transA=0, transB=1, alpha=1.0, dtype=int(ir.DataType.FLOAT))
        x = q.inputs[0]
        lead = b.op("Shape", [x], "lead_shape", end=-1)
        shape = b.op("Concat", [lead, b.const("out_channels", np.array([n], np.int64))], "out_shape", axis=0)
        out = b.op("Reshape", [y, shape], "output")
        rows.type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)
        y.type = out.type = ir.TensorType(ir.DataType.FLOAT)
        ir_utils.replace_output(node.outputs[0], out)
        graph.remove(node, safe=True)
