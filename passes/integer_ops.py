"""Requantization fusion: DQ → op → Q subgraphs become ONNX Runtime's integer kernels.

With ``x ≈ s_x (x^q − z_x)``, ``W ≈ s_w W^q`` (``z_w = 0``) and the int32 bias ``b^q`` on the
``s_x s_w`` grid (``passes.precompute_bias``), seed 004's algebra gives::

    q_y = round((s_x s_w / s_y) · (Σ (x^q − z_x) W^q + b^q)) + z_y        (8-bit output)
      y =        s_x s_w       · (Σ x^q W^q + B^q),  B^q = b^q − z_x ΣW^q (float output)

Rules (each refuses, with the reason, what the target has no fast kernel for):

* ``Q(act(Conv(DQ x, DQ W, DQ b^q)))`` → ``QLinearConv``; ``act`` = Relu/Clip is absorbed when
  the output grid already saturates at the clip bounds (seed 004: "ReLU is essentially a
  clipping operation … happens for free"): ``q(lo) ≤ q_min`` and ``q(hi) ≥ q_max``;
* ``Q(MatMul(DQ x, DQ W))`` → ``QLinearMatMul``;
* ``Q(Add(DQ a, DQ b))`` → ``com.microsoft.QLinearAdd``;
* ``Q(GlobalAveragePool(DQ x))`` → ``com.microsoft.QLinearGlobalAveragePool``;
* ``MatMul(DQ x, DQ W) [+ DQ b^q]`` and ``Gemm`` with a float output →
  ``com.microsoft.MatMulIntegerToFloat`` with the zero point folded into the bias (``B^q``), so
  the kernel runs with no activation zero point.

Activations must be uint8 (ONNX Runtime's U8S8 kernels; int8 activations run S8S8 paths that
are slower than fp32 on x86, and leave 1×1 convs in float) and weights int8 with zero point 0.
Integer ``ConvInteger`` is never emitted (8–12× slower than fp32 on the CPU provider).
A DequantizeLinear read by several ops is first duplicated so that each op's pattern owns one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from passes.activation_points import is_global_pool
from qcompiler import ir_utils
from qcompiler import quant_math as qm

MS = "com.microsoft"


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None else ir_utils.constant_array(value)


def activation_refusal(scale: ir.Value, zero: ir.Value | None) -> str | None:
    """None for a per-tensor uint8 activation grid, else why it cannot run on U8S8 kernels."""
    s, z = _const(scale), _const(zero)
    if s is None or s.size != 1:
        return "activation scale is not a constant scalar (per-tensor)"
    if z is None or z.size != 1:
        return "activation zero point is not a constant scalar"
    if z.dtype != np.uint8:
        return f"activation is {z.dtype} (ONNX Runtime's fast kernels take uint8)"
    return None


def weight_refusal(weight: ir.Value, output_axis: int) -> str | None:
    """None when ``weight`` is ``DequantizeLinear`` of a constant int8 tensor with zero point 0
    and one scale per tensor or per output channel — along ``output_axis`` (0 for Conv and a
    ``transB`` Gemm weight, 1 for a ``[K, N]`` MatMul/Gemm weight)."""
    dq = weight.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return "weight is not dequantized"
    w, s = _const(dq.inputs[0]), _const(dq.inputs[1])
    z = _const(_input(dq, 2))
    if w is None or w.dtype != np.int8:
        return "weight is not a constant int8 tensor"
    channels = w.shape[output_axis]
    if s is None or s.size not in (1, channels):
        return "weight scale is not per-tensor or per output channel"
    if s.size > 1 and dq.attributes.get_int("axis", 1) % w.ndim != output_axis:
        return "weight is quantized along another axis than its output channels"
    if z is not None and np.any(z != 0):
        return "weight zero point is not 0"
    return None


def _grid_point(v: float, scale: np.ndarray, zero: np.ndarray) -> float:
    return float(np.rint(np.float32(v) / scale.reshape(())) + zero.reshape(()).astype(np.float64))


def absorbable(activation: ir.Node | None, y_scale: ir.Value, y_zero: ir.Value) -> str | None:
    """None when quantizing to (y_scale, y_zero) already clips as ``activation`` does."""
    if activation is None:
        return None
    s, z = _const(y_scale), _const(y_zero)
    lo, hi = 0.0, np.inf
    if activation.op_type == "Clip":
        lo_v, hi_v = (_const(v) for v in (list(activation.inputs) + [None, None])[1:3])
        if lo_v is None or hi_v is None:
            return "Clip bounds are not constants"
        lo, hi = float(lo_v), float(hi_v)
    info = np.iinfo(z.dtype)
    if _grid_point(lo, s, z) > info.min:
        return f"{activation.op_type} lower bound {lo} is above the output grid's minimum"
    if np.isfinite(hi) and _grid_point(hi, s, z) < info.max:
        return f"{activation.op_type} upper bound {hi} is inside the output grid (would not clip)"
    return None


def int32_bias(value: ir.Value | None, grid: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The int32 ``b^q`` behind the bias input ``value`` (None when absent), or a refusal."""
    if value is None:
        return None, None
    dq = value.producer()
    bias = _const(dq.inputs[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if bias is None or bias.dtype != np.int32:
        return None, "bias is not int32 behind DequantizeLinear (run PrecomputeBiasPass)"
    if not np.allclose(_const(dq.inputs[1]), grid, rtol=1e-5):
        return None, "bias scale is not s_x·s_w"
    return bias, None


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


# --- QLinearConv ------------------------------------------------------------------------------


class QLinearConvRule(RewriteRuleClassBase):
    """``Q(act(Conv(DQ x, DQ W [, DQ b^q])))`` → ``QLinearConv`` (act: None, Relu or Clip)."""

    def __init__(self, activation: str | None = None) -> None:
        super().__init__(name=f"QLinearConv{activation or ''}")
        self.activation = activation

    def pattern(self, op, xq, sx, zx, wq, sw, zw, sy, zy):
        x = op.DequantizeLinear(xq, sx, zx, _allow_other_attributes=True)
        w = op.DequantizeLinear(wq, sw, zw, _allow_other_attributes=True)
        y = op.Conv(x, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["conv"])
        if self.activation == "Relu":
            y = op.Relu(y, _outputs=["act"])
        elif self.activation == "Clip":
            y = op.Clip(y, _allow_other_inputs=True, _outputs=["act"])
        return op.QuantizeLinear(y, sy, zy, _allow_other_attributes=True)

    def check(self, context, xq, sx, zx, wq, sw, zw, sy, zy, conv, act=None) -> MatchResult:
        why = (
            activation_refusal(sx, zx)
            or weight_refusal(conv.producer().inputs[1], 0)
            or activation_refusal(sy, zy)
            or absorbable(act.producer() if act is not None else None, sy, zy)
        )
        if why is None:
            grid = _const(sx).reshape(()) * _const(sw).reshape(-1)
            why = int32_bias(_input(conv.producer(), 2), grid)[1]
        return MatchResult().fail(why) if why else MatchResult()

    def rewrite(self, op, xq, sx, zx, wq, sw, zw, sy, zy, conv, act=None):
        node = conv.producer()
        inputs = [xq, sx, zx, wq, sw, zw, sy, zy]
        if _input(node, 2) is not None:  # the int32 b^q the check accepted, as it is
            inputs.append(_input(node, 2).producer().inputs[0])
        return op.QLinearConv(*inputs, **node.attributes)


# --- QLinearMatMul ----------------------------------------------------------------------------


class QLinearMatMulRule(RewriteRuleClassBase):
    """``Q(MatMul(DQ x, DQ W))`` → ``QLinearMatMul`` (8-bit in, 8-bit out, no bias)."""

    def pattern(self, op, xq, sx, zx, wq, sw, zw, sy, zy):
        x = op.DequantizeLinear(xq, sx, zx, _allow_other_attributes=True)
        w = op.DequantizeLinear(wq, sw, zw, _allow_other_attributes=True)
        y = op.MatMul(x, w, _outputs=["mm"])
        return op.QuantizeLinear(y, sy, zy, _allow_other_attributes=True)

    def check(self, context, xq, sx, zx, wq, sw, zw, sy, zy, mm) -> MatchResult:
        weight = _const(wq)
        if weight is None or weight.ndim != 2:
            return MatchResult().fail("weight is not a constant 2-D tensor")
        why = (
            activation_refusal(sx, zx)
            or weight_refusal(mm.producer().inputs[1], 1)
            or activation_refusal(sy, zy)
        )
        return MatchResult().fail(why) if why else MatchResult()

    def rewrite(self, op, xq, sx, zx, wq, sw, zw, sy, zy, mm):
        return op.QLinearMatMul(xq, sx, zx, wq, sw, zw, sy, zy)


# --- 8-bit elementwise and pooling (com.microsoft) --------------------------------------------


class QLinearAddRule(RewriteRuleClassBase):
    """``Q(Add(DQ a, DQ b))`` → ``com.microsoft.QLinearAdd``."""

    def pattern(self, op, aq, sa, za, bq, sb, zb, sy, zy):
        a = op.DequantizeLinear(aq, sa, za, _allow_other_attributes=True)
        b = op.DequantizeLinear(bq, sb, zb, _allow_other_attributes=True)
        return op.QuantizeLinear(op.Add(a, b), sy, zy, _allow_other_attributes=True)

    def check(self, context, aq, sa, za, bq, sb, zb, sy, zy) -> MatchResult:
        why = activation_refusal(sa, za) or activation_refusal(sb, zb) or activation_refusal(sy, zy)
        return MatchResult().fail(why) if why else MatchResult()

    def rewrite(self, op, aq, sa, za, bq, sb, zb, sy, zy):
        return op.QLinearAdd(aq, sa, za, bq, sb, zb, sy, zy, _domain=MS)


class QLinearGlobalAveragePoolRule(RewriteRuleClassBase):
    """``Q(GlobalAveragePool(DQ x))`` or its ``ReduceMean`` form →
    ``com.microsoft.QLinearGlobalAveragePool`` (NCHW)."""

    def __init__(self, op_type: str = "GlobalAveragePool") -> None:
        super().__init__(name=f"QLinearGlobalAveragePool_{op_type}")
        self.op_type = op_type

    def pattern(self, op, xq, sx, zx, sy, zy):
        x = op.DequantizeLinear(xq, sx, zx, _allow_other_attributes=True)
        pooled = getattr(op, self.op_type)(x, _allow_other_inputs=True,
                                           _allow_other_attributes=True, _outputs=["pooled"])
        return op.QuantizeLinear(pooled, sy, zy, _allow_other_attributes=True)

    def check(self, context, xq, sx, zx, sy, zy, pooled) -> MatchResult:
        if not is_global_pool(pooled.producer()):
            return MatchResult().fail("not a mean over both spatial axes of NCHW with keepdims")
        why = activation_refusal(sx, zx) or activation_refusal(sy, zy)
        return MatchResult().fail(why) if why else MatchResult()

    def rewrite(self, op, xq, sx, zx, sy, zy, pooled):
        return op.QLinearGlobalAveragePool(xq, sx, zx, sy, zy, channels_last=0, _domain=MS)


# --- float-output MatMul/Gemm: MatMulIntegerToFloat -------------------------------------------


class MatMulIntegerToFloatRule(RewriteRuleClassBase):
    """``MatMul(DQ x, DQ W) [+ DQ b^q]`` or ``Gemm(DQ x, DQ W [, DQ b^q])`` with a float
    output → ``MatMulIntegerToFloat(x^q, W^q, s_x, s_w, bias = s_x s_w B^q)``."""

    def __init__(self, form: str) -> None:
        super().__init__(name=f"MatMulIntegerToFloat_{form}")
        self.form = form  # "matmul", "matmul_bias", "bias_matmul" (Add's inputs swapped), "gemm"

    def pattern(self, op, xq, sx, zx, wq, sw, zw, bias):
        x = op.DequantizeLinear(xq, sx, zx, _allow_other_attributes=True)
        w = op.DequantizeLinear(wq, sw, zw, _allow_other_attributes=True)
        if self.form == "gemm":
            return op.Gemm(x, w, _allow_other_inputs=True, _allow_other_attributes=True,
                           _outputs=["linear"])
        y = op.MatMul(x, w, _outputs=["linear"])
        if self.form == "matmul":
            return y
        return op.Add(y, bias) if self.form == "matmul_bias" else op.Add(bias, y)

    def _parts(self, sx, wq, sw, linear, bias):
        """(W^q as [K, N], weight scale with alpha, int32 bias or None, refusal)."""
        node = linear.producer()
        weight = _const(wq)
        if weight is None or weight.ndim != 2:
            return None, None, None, "weight is not a constant 2-D tensor"
        w_scale = _const(sw).reshape(-1).astype(np.float32)
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                return None, None, None, "Gemm with transA"
            if node.attributes.get_int("transB", 0):
                weight = weight.T
            w_scale = w_scale * np.float32(node.attributes.get_float("alpha", 1.0))
            bias = _input(node, 2)
            if bias is not None and node.attributes.get_float("beta", 1.0) != 1.0:
                return None, None, None, "Gemm beta ≠ 1 (run PrecomputeBiasPass)"
        elif self.form == "matmul":
            bias = None
        grid = _const(sx).reshape(()) * w_scale
        bias_q, why = int32_bias(bias, grid)
        return weight, w_scale, bias_q, why

    def check(self, context, xq, sx, zx, wq, sw, zw, linear, bias=None, **_) -> MatchResult:
        weight = _const(wq)
        why = activation_refusal(sx, zx)
        if why is None and weight is not None and weight.ndim == 2:
            node = linear.producer()
            why = weight_refusal(node.inputs[1], 0 if node.attributes.get_int("transB", 0) else 1)
        if why is None:
            why = self._parts(sx, wq, sw, linear, bias)[3]
        return MatchResult().fail(why) if why else MatchResult()

    def rewrite(self, op, xq, sx, zx, wq, sw, zw, linear, bias=None, **_):
        weight, w_scale, bias_q, _ = self._parts(sx, wq, sw, linear, bias)
        channels = weight.shape[1]
        x_scale, x_zero = _const(sx).reshape(()), int(_const(zx).reshape(()))
        bias_q = np.zeros(channels, np.int32) if bias_q is None else bias_q
        folded = qm.fold_zero_point(bias_q, x_zero, weight, reduce_axes=(0,))
        grid = np.broadcast_to(x_scale * w_scale, (channels,))
        node = linear.producer()

        def initializer(suffix: str, array: np.ndarray) -> ir.Value:
            name = ir_utils.unique_name(node.graph, f"{node.name or 'linear'}.{suffix}")
            return op.initializer(ir.tensor(array), name=name)

        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        scaled = not np.array_equal(w_scale, _const(sw).reshape(-1))
        inputs = [
            xq,
            initializer("weight_kn", np.ascontiguousarray(weight)) if transposed else wq,
            sx,
            initializer("weight_scale", w_scale) if scaled else sw,
            None,
            None,
        ]
        if np.any(folded):
            bias_f = (grid * folded.astype(np.float64)).astype(np.float32)
            inputs.append(initializer("bias_folded", bias_f))
        return op.MatMulIntegerToFloat(*inputs, _domain=MS)


def rule_stages() -> list[RewriteRuleSet]:
    """Rule sets applied one after the other: the rewriter tries rules node by node, so a
    smaller pattern rooted earlier (MatMul) would take the match of a larger one (MatMul + bias
    Add, or MatMul + Q) — larger patterns go in earlier stages."""
    return [
        RewriteRuleSet(
            [QLinearConvRule.rule(a) for a in ("Clip", "Relu", None)]
            + [QLinearMatMulRule.rule(), QLinearAddRule.rule()]
            + [QLinearGlobalAveragePoolRule.rule(t) for t in ("GlobalAveragePool", "ReduceMean")]
        ),
        RewriteRuleSet([MatMulIntegerToFloatRule.rule(f) for f in ("matmul_bias", "bias_matmul")]),
        RewriteRuleSet([MatMulIntegerToFloatRule.rule(f) for f in ("gemm", "matmul")]),
    ]


def unshare_dequantize(graph: ir.Graph) -> int:
    """Give each reader of a multiply-read DequantizeLinear its own copy; returns copies made."""
    copies = 0
    for node in tuple(graph):
        if node.op_type != "DequantizeLinear" or node.domain != "":
            continue
        uses = list(node.outputs[0].uses())
        for reader, index in uses[1:]:
            copy = ir.node(
                "DequantizeLinear", list(node.inputs), attributes=dict(node.attributes),
                name=ir_utils.unique_name(graph, f"{node.name or 'dq'}.copy", kind="node"),
            )
            copy.outputs[0].name = ir_utils.unique_name(graph, f"{node.outputs[0].name}.copy")
            copy.outputs[0].type, copy.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
            graph.insert_after(node, copy)
            reader.replace_input_with(index, copy.outputs[0])
            copies += 1
    return copies


class FuseIntegerOpsPass(ir.passes.InPlacePass):
    """Rewrite DQ → op → Q subgraphs into integer kernels (module docstring); reports the
    count. Q/DQ pairs the rules refuse stay, and ONNX Runtime runs them in float."""

    def __init__(self) -> None:
        super().__init__()
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        copies = unshare_dequantize(model.graph)
        count = sum(stage.apply_to_model(model) for stage in rule_stages())
        if copies:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        self.summary = f"{count} fused" if count else ""
        return ir.passes.PassResult(model, modified=bool(count or copies))
