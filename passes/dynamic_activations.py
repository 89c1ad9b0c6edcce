"""Dynamic activation quantization of MatMul/Gemm targets, lowered to ONNX Runtime's
``com.microsoft.MatMulIntegerToFloat`` (integer product, per-column weight scale and a bias in
one kernel).

Per-token (seed 003: "for int8 dynamic quantization, use per-token"), one scale per row of
``X``. ONNX Runtime's fast U8S8 kernels take only a *scalar* activation zero point, so:

* ``per-token`` (asymmetric): each row's ``[m_r, M_r]`` maps onto ``[0, 255]`` and its offset
  ``m_r`` leaves the integer product as a rank-1 correction with precomputed column sums
  ``c[n] = Σ_k Ŵ[k, n]`` (exact algebra, since ``x ≈ s_r·x^q + m_r``)::

      s_r = max(M_r − m_r, ε) / 255        X^q[r, k] = round((X[r, k] − m_r) / s_r)   (uint8)
      Y[r, n] = s_r · s_w[n] · Σ_k X^q[r, k] · W^q[k, n]  +  m_r · c[n]

* ``per-token-sym``: ``s_r = max(max_k |X[r, k]|, ε) / 127`` and ``X^q = round(X / s_r) + 128``
  stored as uint8 with the common zero point 128::

      Y[r, n] = s_r · s_w[n] · Σ_k (X^q[r, k] − 128) · W^q[k, n]
              = s_r · (s_w[n] · Σ_k X^q[r, k] · W^q[k, n]  −  128 · s_w[n] · c_q[n])

  the second term, with ``c_q[n] = Σ_k W^q[k, n]``, is the kernel's constant bias: the
  zero point is folded away offline (seed 004's ``−z_x·ΣW^q``), the row scale applied after.

Both measured 2.4–3.3× faster than fp32 per MatMul on 2 threads; the asymmetric rows halve the
step of skewed rows (SmolLM2 perplexity ×1.030 symmetric → see the benchmark).
Per-tensor (``dynamic``): ``DynamicQuantizeLinear`` gives one uint8 scale/zero point::

    Y = s_x · s_w[n] · Σ_k (X^q − z_x) · W^q[k, n]

The weight stays int8 ``[K, N]`` (a ``transB`` Gemm weight is stored transposed); Gemm's
``alpha`` folds into ``s_w`` and ``beta·C`` is added after. The row statistics and ``X^q`` are
computed once per activation, shared by all targets reading it (q/k/v projections). Convs keep
float activations here (integer Conv is slow on ONNX Runtime's CPU provider).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.insert_static_qdq import ACTIVATION_KEY
from passes.quantize_weights import WEIGHT_KEY
from passes.select_targets import QuantTarget, targets
from qcompiler import ir_utils

MS = "com.microsoft"
PER_TOKEN_ZERO_POINT = 128
ROW_EPSILON = np.float32(1e-8)


SCHEMES = ("per-token", "per-token-sym", "dynamic")


class LowerDynamicActivationsPass(ir.passes.InPlacePass):
    """Replace each weight-quantized MatMul/Gemm by dynamic activation quantization +
    ``MatMulIntegerToFloat`` + rescale; ``scheme`` is one of ``SCHEMES`` (module docstring)."""

    def __init__(self, scheme: str = "per-token") -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown dynamic scheme {scheme!r}")
        self.scheme = scheme
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chosen = [t for t in targets(model)  # graph order: the first reader of X comes first
                  if ACTIVATION_KEY not in t.node.meta and WEIGHT_KEY in t.node.meta]
        float_convs = sum(t.op_type == "Conv" for t in chosen)
        modified = self.lower(model, [t for t in chosen if t.op_type != "Conv"])
        self.summary = (
            f"{float_convs} Conv keep float activations (static needs --calib-data)"
            if float_convs else ""
        )
        return ir.passes.PassResult(model, modified=modified)

    def lower(self, model: ir.Model, chosen: list[QuantTarget]) -> bool:
        """Lower the weight-quantized MatMul/Gemm ``chosen`` (in graph order); True if any."""
        graph = model.graph
        opset = model.opset_imports.get("", 13)
        quantized: dict[int, tuple] = {}
        for target in chosen:
            key = id(target.activation)
            if key not in quantized:
                quantized[key] = self._quantize_activation(graph, target, opset)
            self._lower(graph, target, *quantized[key])
            target.node.meta[ACTIVATION_KEY] = self.scheme
        if chosen:
            model.opset_imports.setdefault(MS, 1)
        return bool(chosen)

    def _quantize_activation(self, graph: ir.Graph, target: QuantTarget, opset: int):
        """``(X^q, zero point, scale, row offset or None)`` of the target's activation, built
        just before the target (its first reader)."""
        x = target.activation
        b = ir_utils.NodeBuilder(graph, target.node, x.name or "activation")
        if self.scheme == "dynamic":
            xq, scale, zero = b.op("DynamicQuantizeLinear", [x], "dynamic_quantize", num_outputs=3)
            return xq, zero, scale, None

        def row_reduce(op_type: str, value: ir.Value, suffix: str) -> ir.Value:
            if opset >= 18:
                axes = b.const("axes", np.array([-1], np.int64))
                return b.op(op_type, [value, axes], suffix, keepdims=1)
            return b.op(op_type, [value], suffix, axes=[-1], keepdims=1)

        epsilon = b.const("epsilon", ROW_EPSILON)
        unit = b.const("unit_scale", np.float32(1.0))
        if self.scheme == "per-token-sym":
            amax = row_reduce("ReduceMax", b.op("Abs", [x], "abs"), "row_absmax")
            amax = b.op("Max", [amax, epsilon], "row_absmax_safe")
            scale = b.op("Div", [amax, b.const("qmax", np.float32(127.0))], "row_scale")
            zero = b.const("zero_point", np.uint8(PER_TOKEN_ZERO_POINT))
            xq = b.op("QuantizeLinear", [b.op("Div", [x, scale], "scaled"), unit, zero], "quantize")
            return xq, zero, scale, None
        low = row_reduce("ReduceMin", x, "row_min")
        span = b.op("Sub", [row_reduce("ReduceMax", x, "row_max"), low], "row_span")
        span = b.op("Max", [span, epsilon], "row_span_safe")
        scale = b.op("Div", [span, b.const("levels", np.float32(255.0))], "row_scale")
        shifted = b.op("Sub", [x, low], "shifted")
        zero = b.const("zero_point", np.uint8(0))
        xq = b.op("QuantizeLinear", [b.op("Div", [shifted, scale], "scaled"), unit, zero], "quantize")
        return xq, zero, scale, low

    @staticmethod
    def _lower(graph: ir.Graph, target: QuantTarget, xq, x_zero, x_scale, x_offset) -> None:
        """``MatMulIntegerToFloat(X^q, W^q, 1|s_x, s_w) · s_r [+ m_r·c] [+ bias]``, a constant
        zero point folded into the kernel's bias (``−z·s_w·ΣW^q``)."""
        node = target.node
        weight = node.meta[WEIGHT_KEY]
        q, w_scale = weight.q, weight.scale.reshape(-1).astype(np.float32)
        alpha, beta, bias = 1.0, 1.0, None
        if node.op_type == "Gemm":
            if node.attributes.get_int("transB", 0):
                q = q.T
            alpha = node.attributes.get_float("alpha", 1.0)
            beta = node.attributes.get_float("beta", 1.0)
            bias = node.inputs[2] if len(node.inputs) > 2 else None
        b = ir_utils.NodeBuilder(graph, node, node.name or node.outputs[0].name or "matmul")
        w_rescale = (alpha * w_scale).astype(np.float32)
        column_sums = w_rescale * q.astype(np.float64).sum(axis=0)  # alpha · s_w[n] · Σ_k W^q[k, n]
        inputs = [xq, b.const("weight_q", np.ascontiguousarray(q))]
        zero = ir_utils.constant_array(x_zero)
        if zero is None:
            # per tensor: the run-time scale and zero point go to the kernel as they are
            inputs += [x_scale, b.const("weight_scale", w_rescale), x_zero]
            y = b.op("MatMulIntegerToFloat", inputs, "matmul_integer", domain=MS)
        else:
            zero = int(zero)
            inputs += [b.const("unit_scale", np.float32(1.0)), b.const("weight_scale", w_rescale)]
            if zero:
                inputs += [None, None, b.const("zero_fold", (-zero * column_sums).astype(np.float32))]
            y = b.op("MatMulIntegerToFloat", inputs, "matmul_integer", domain=MS)
            y = b.op("Mul", [y, x_scale], "row_rescale")
        if x_offset is not None:  # + m_r · c[n]
            offset = b.op("Mul", [x_offset, b.const("column_sums", column_sums.astype(np.float32))], "row_offset")
            y = b.op("Add", [y, offset], "add_row_offset")
        if bias is not None:
            if beta != 1.0:
                bias = b.op("Mul", [bias, b.const("beta", np.float32(beta))], "beta")
            y = b.op("Add", [y, bias], "bias")
        ir_utils.replace_output(node.outputs[0], y)
