"""QDQ clean-up rules: move Q/DQ across shape-only ops and cancel round trips.

A per-tensor QuantizeLinear/DequantizeLinear is elementwise with one scale and zero point, so it
commutes with every op that only moves elements (``Reshape``, ``Flatten``, ``Transpose``,
``Squeeze``, ``Unsqueeze``)::

    Q(S(y)) = S(Q(y))          S(DQ(x)) = DQ(S(x))

DequantizeLinear also commutes with ``Gather`` along any axis (it picks elements) and with
``Concat`` when every input shares one scale and zero point::

    Gather(DQ(x), i) = DQ(Gather(x, i))       Concat(DQ(a, s, z), DQ(b, s, z)) = DQ(Concat(a, b), s, z)

(Q is not hoisted above a Gather: that would quantize the whole table to read a few rows.)
Hoisting Q above a shape op and sinking DQ below one brings each pair next to the op it
belongs to (``GlobalAveragePool → Flatten → Q`` becomes ``GlobalAveragePool → Q → Flatten``, so
the pooling can run on integers) and shape ops then move 8-bit data. A round trip with equal
parameters is the identity: ``Q(DQ(x, s, z), s, z) = x`` (``x`` already on that grid).
Per-axis pairs do not commute with shape ops (the axis moves): refused, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from passes.activation_points import SHAPE_ONLY_OPS
from qcompiler import ir_utils


def per_tensor(scale: ir.Value, zero: ir.Value | None) -> str | None:
    """None when ``scale``/``zero`` are constant scalars, else why not."""
    s = ir_utils.constant_array(scale)
    if s is None:
        return "scale is not a constant"
    if s.size != 1:
        return "per-axis parameters do not commute with a shape op"
    if zero is not None and ir_utils.constant_array(zero) is None:
        return "zero point is not a constant"
    return None


def same_params(s1, z1, s2, z2) -> bool:
    a, b = ir_utils.constant_array(s1), ir_utils.constant_array(s2)
    za, zb = ir_utils.constant_array(z1), ir_utils.constant_array(z2)
    if a is None or b is None or za is None or zb is None or za.dtype != zb.dtype:
        return False
    return a.shape == b.shape and np.array_equal(a, b) and np.array_equal(za, zb)


class HoistQuantize(RewriteRuleClassBase):
    """``Q(S(y)) → S(Q(y))`` for a shape-only op ``S``."""

    def __init__(self, op_type: str) -> None:
        super().__init__(name=f"HoistQuantizeAbove{op_type}")
        self.op_type = op_type

    def pattern(self, op, y, scale, zero):
        shaped = getattr(op, self.op_type)(y, _allow_other_inputs=True, _allow_other_attributes=True,
                       _outputs=["shaped"])
        return op.QuantizeLinear(shaped, scale, zero, _allow_other_attributes=True)

    def check(self, context, y, scale, zero, shaped, **_) -> MatchResult:
        why = per_tensor(scale, zero)
        return MatchResult().fail(why) if why else MatchResult()

    def rewrite(self, op, y, scale, zero, shaped, **_):
        node = shaped.producer()
        q = op.QuantizeLinear(y, scale, zero)
        return op.op(self.op_type, q, *node.inputs[1:], **node.attributes)


class SinkDequantize(RewriteRuleClassBase):
    """``S(DQ(x)) → DQ(S(x))`` for a shape-only op ``S``."""

    def __init__(self, op_type: str) -> None:
        super().__init__(name=f"SinkDequantizeBelow{op_type}")
        self.op_type = op_type

    def pattern(self, op, x, scale, zero):
        dq = op.DequantizeLinear(x, scale, zero, _allow_other_attributes=True)
        return getattr(op, self.op_type)(dq, _allow_other_inputs=True, _allow_other_attributes=True,
                     _outputs=["shaped"])

    def check(self, context, x, scale, zero, shaped, **_) -> MatchResult:
        why = per_tensor(scale, zero)
        return MatchResult().fail(why) if why else MatchResult()

    def rewrite(self, op, x, scale, zero, shaped, **_):
        node = shaped.producer()
        moved = op.op(self.op_type, x, *node.inputs[1:], **node.attributes)
        return op.DequantizeLinear(moved, scale, zero)


class _SinkDequantizeBelowConcat(RewriteRuleClassBase):
    """``Concat(DQ(a, s, z), DQ(b, s, z), …) → DQ(Concat(a, b, …), s, z)``; subclasses fix
    the number of inputs (patterns have a fixed arity)."""

    def _check(self, pairs, joined) -> MatchResult:
        why = next((w for w in (per_tensor(s, z) for s, z in pairs) if w), None)
        if why:
            return MatchResult().fail(why)
        if not all(same_params(*pairs[0], *other) for other in pairs[1:]):
            return MatchResult().fail("inputs have different scales: Concat would requantize")
        return MatchResult()

    def _rewrite(self, op, xs, s, z, joined):
        return op.DequantizeLinear(op.Concat(*xs, **joined.producer().attributes), s, z)


def _dq(op, x, s, z):
    return op.DequantizeLinear(x, s, z, _allow_other_attributes=True)


class SinkDequantizeBelowConcat2(_SinkDequantizeBelowConcat):
    def pattern(self, op, x0, s0, z0, x1, s1, z1):
        return op.Concat(_dq(op, x0, s0, z0), _dq(op, x1, s1, z1), _allow_other_attributes=True,
                         _outputs=["joined"])

    def check(self, context, x0, s0, z0, x1, s1, z1, joined) -> MatchResult:
        return self._check([(s0, z0), (s1, z1)], joined)

    def rewrite(self, op, x0, s0, z0, x1, s1, z1, joined):
        return self._rewrite(op, [x0, x1], s0, z0, joined)


class SinkDequantizeBelowConcat3(_SinkDequantizeBelowConcat):
    def pattern(self, op, x0, s0, z0, x1, s1, z1, x2, s2, z2):
        return op.Concat(_dq(op, x0, s0, z0), _dq(op, x1, s1, z1), _dq(op, x2, s2, z2),
                         _allow_other_attributes=True, _outputs=["joined"])

    def check(self, context, x0, s0, z0, x1, s1, z1, x2, s2, z2, joined) -> MatchResult:
        return self._check([(s0, z0), (s1, z1), (s2, z2)], joined)

    def rewrite(self, op, x0, s0, z0, x1, s1, z1, x2, s2, z2, joined):
        return self._rewrite(op, [x0, x1, x2], s0, z0, joined)


class CancelRoundTrip(RewriteRuleClassBase):
    """``Q(DQ(x, s, z), s, z) → x``."""

    def pattern(self, op, x, s1, z1, s2, z2):
        dq = op.DequantizeLinear(x, s1, z1, _allow_other_attributes=True)
        return op.QuantizeLinear(dq, s2, z2, _allow_other_attributes=True)

    def check(self, context, x, s1, z1, s2, z2, **_) -> MatchResult:
        if not same_params(s1, z1, s2, z2):
            return MatchResult().fail("different scale or zero point: a real requantization")
        scale = ir_utils.constant_array(s1)
        if scale.size > 1:
            dq, q = s1.uses(), s2.uses()
            axes = {u.node.attributes.get_int("axis", 1) for u in (*dq, *q)
                    if u.node.op_type in ("QuantizeLinear", "DequantizeLinear")}
            if len(axes) != 1:
                return MatchResult().fail("per-axis parameters along different axes")
        return MatchResult()

    def rewrite(self, op, x, **_):
        return op.Identity(x)


def rules() -> RewriteRuleSet:
    return RewriteRuleSet(
        [HoistQuantize.rule(t) for t in SHAPE_ONLY_OPS]
        + [SinkDequantize.rule(t) for t in (*SHAPE_ONLY_OPS, "Gather")]
        + [SinkDequantizeBelowConcat2.rule(), SinkDequantizeBelowConcat3.rule()]
        + [CancelRoundTrip.rule()]
    )


class MoveQDQPass(ir.passes.InPlacePass):
    """Apply the clean-up rules until nothing changes (each rule moves a pair one way only, so
    this ends); Identity nodes left by cancellations are removed."""

    MAX_ROUNDS = 32

    def __init__(self) -> None:
        super().__init__()
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        total = 0
        ruleset = rules()
        for _ in range(self.MAX_ROUNDS):
            count = ruleset.apply_to_model(model)
            total += count
            if not count:
                break
        if total:
            ir.passes.common.IdentityEliminationPass()(model)
        self.summary = f"{total} Q/DQ moves or cancellations" if total else ""
        return ir.passes.PassResult(model, modified=bool(total))
