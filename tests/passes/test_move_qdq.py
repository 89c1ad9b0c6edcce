import numpy as np
import pytest
from onnx import TensorProto, helper
from onnxscript.rewriter import MatchingTracer, MatchStatus

from passes.move_qdq import CancelRoundTrip, HoistQuantize, MoveQDQPass, SinkDequantize, rules
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir

X_SHAPE = [2, 1, 3, 4]
# op, its extra constant input (or None), attributes, output shape
SHAPE_OPS = {
    "Flatten": (None, {"axis": 2}, [2, 12]),
    "Reshape": (np.array([2, -1], np.int64), {}, [2, 12]),
    "Transpose": (None, {"perm": [0, 3, 1, 2]}, [2, 4, 1, 3]),
    "Squeeze": (np.array([1], np.int64), {}, [2, 3, 4]),
    "Unsqueeze": (np.array([0], np.int64), {}, [1, 2, 1, 3, 4]),
}


def _shape_op(op, source, target):
    extra, attrs, shape = SHAPE_OPS[op]
    inputs = [source] + (["extra"] if extra is not None else [])
    inits = {"extra": extra} if extra is not None else {}
    return helper.make_node(op, inputs, [target], name="shape_op", **attrs), inits, shape


def _refusals(rule_set, model) -> list[str]:
    """Reasons the rules' checks gave (a tracer leaves the model unchanged)."""
    tracer = MatchingTracer()
    rule_set.apply_to_model(model, tracer=tracer)
    return [
        info.match_result.reason
        for infos in tracer.best_matches_map.values()
        for info in infos
        if info.status == MatchStatus.CONDITION_FAILED
    ]


def _shape_then_qdq(op, scale=0.05, zero=128, axis=None):
    """x → S → Q → DQ → y (float)."""
    shape_node, inits, shape = _shape_op(op, "x", "t")
    inits.update({"s": np.asarray(scale, np.float32), "z": np.full(np.shape(scale), zero, np.uint8)})
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        shape_node,
        helper.make_node("QuantizeLinear", ["t", "s", "z"], ["q"], name="quant", **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant", **attrs),
    ]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
        opset=graphs.QDQ_OPSET,
    )


def _dq_then_shape(op, scale=0.05, zero=128, axis=None):
    """x^q (uint8 input) → DQ → S → y (float)."""
    shape_node, inits, shape = _shape_op(op, "x_dq", "y")
    inits.update({"s": np.asarray(scale, np.float32), "z": np.full(np.shape(scale), zero, np.uint8)})
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="dequant", **attrs), shape_node]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x_q", TensorProto.UINT8, X_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
        opset=graphs.QDQ_OPSET,
    )


def _x(seed=0):
    return (np.random.default_rng(seed).normal(size=X_SHAPE) * 3).astype(np.float32)


def _xq(seed=0):
    return np.random.default_rng(seed).integers(0, 256, X_SHAPE).astype(np.uint8)


@pytest.mark.parametrize("op", list(SHAPE_OPS))
def test_quantize_is_hoisted_above_a_shape_op(op):
    proto = _shape_then_qdq(op)
    model = to_ir(proto)
    assert HoistQuantize.rule(op).apply_to_model(model) == 1
    check(model)
    assert op_types(model) == ["QuantizeLinear", op, "DequantizeLinear"]
    quant = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    assert quant.inputs[0].name == "x"  # reads the graph input, before the shape op
    x = _x()
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(proto, {"x": x})[0])


@pytest.mark.parametrize("op", list(SHAPE_OPS))
def test_dequantize_sinks_below_a_shape_op(op):
    proto = _dq_then_shape(op)
    model = to_ir(proto)
    assert SinkDequantize.rule(op).apply_to_model(model) == 1
    check(model)
    assert op_types(model) == [op, "DequantizeLinear"]
    x_q = _xq()
    np.testing.assert_array_equal(run(model, {"x_q": x_q})[0], run(proto, {"x_q": x_q})[0])


def test_per_axis_quantize_is_not_hoisted():
    # Q on axis 3 of the transposed tensor [2, 4, 1, 3]: the axis would move with the Transpose
    model = to_ir(_shape_then_qdq("Transpose", scale=[0.05, 0.1, 0.2], axis=3))
    before = op_types(model)
    assert _refusals(rules(), model) == ["per-axis parameters do not commute with a shape op"]
    assert HoistQuantize.rule("Transpose").apply_to_model(model) == 0
    assert not MoveQDQPass()(model).modified
    assert op_types(model) == before


def test_per_axis_dequantize_does_not_sink():
    model = to_ir(_dq_then_shape("Transpose", scale=[0.05, 0.1, 0.2], axis=2))
    assert _refusals(rules(), model) == ["per-axis parameters do not commute with a shape op"]
    assert not MoveQDQPass()(model).modified
    assert op_types(model) == ["DequantizeLinear", "Transpose"]


def _round_trip(s_dq=0.05, z_dq=128, s_q=0.05, z_q=128):
    """x^q → DQ(s_dq, z_dq) → Q(s_q, z_q) → y^q (uint8)."""
    nodes = [
        helper.make_node("DequantizeLinear", ["x_q", "s1", "z1"], ["x_dq"], name="dequant"),
        helper.make_node("QuantizeLinear", ["x_dq", "s2", "z2"], ["y"], name="quant"),
    ]
    inits = {"s1": np.float32(s_dq), "z1": np.uint8(z_dq), "s2": np.float32(s_q), "z2": np.uint8(z_q)}
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x_q", TensorProto.UINT8, [256])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [256])],
        inits,
        opset=graphs.QDQ_OPSET,
    )


def test_round_trip_with_equal_parameters_cancels_bit_exactly():
    model = to_ir(_round_trip())
    assert CancelRoundTrip.rule().apply_to_model(model) == 1
    assert op_types(model) == ["Identity"]  # input → output: the Identity must stay
    assert not MoveQDQPass()(model).modified
    check(model)
    every = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(run(model, {"x_q": every})[0], every)


@pytest.mark.parametrize("params", [dict(s_q=0.1), dict(z_q=100)])
def test_round_trip_with_other_parameters_is_a_requantization(params):
    proto = _round_trip(**params)
    model = to_ir(proto)
    assert _refusals(rules(), model) == ["different scale or zero point: a real requantization"]
    assert not MoveQDQPass()(model).modified
    assert op_types(model) == ["DequantizeLinear", "QuantizeLinear"]
    every = np.arange(256, dtype=np.uint8)
    assert not np.array_equal(run(model, {"x_q": every})[0], every)  # a real change of grid


def _dq_shape_ops_qdq():
    """x^q → DQ → Transpose → Flatten → Q → DQ → y (one grid throughout): the DQ sinks twice,
    then meets the Q and the round trip cancels."""
    inits = {"s": np.float32(0.05), "z": np.uint8(128)}
    nodes = [
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["a"], name="dq_in"),
        helper.make_node("Transpose", ["a"], ["b"], perm=[0, 3, 1, 2], name="transpose"),
        helper.make_node("Flatten", ["b"], ["c"], axis=1, name="flatten"),
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"], name="q_out"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq_out"),
    ]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x_q", TensorProto.UINT8, X_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
        inits,
        opset=graphs.QDQ_OPSET,
    )


def test_pass_moves_and_cancels_until_nothing_changes():
    proto = _dq_shape_ops_qdq()
    model = to_ir(proto)
    moved = MoveQDQPass()
    assert moved(model).modified
    assert moved.summary == "3 Q/DQ moves or cancellations"
    check(model)
    assert op_types(model) == ["Transpose", "Flatten", "DequantizeLinear"]
    assert model.graph.outputs[0].name == "y"
    x_q = _xq(1)
    np.testing.assert_array_equal(run(model, {"x_q": x_q})[0], run(proto, {"x_q": x_q})[0])
    second = MoveQDQPass()
    assert not second(model).modified and second.summary == ""
    assert op_types(model) == ["Transpose", "Flatten", "DequantizeLinear"]


@pytest.mark.parametrize("op", ["Flatten", "Transpose"])
def test_pass_on_hoist_runs_twice_without_change(op):
    model = to_ir(_shape_then_qdq(op))
    assert MoveQDQPass()(model).modified
    assert not MoveQDQPass()(model).modified
    assert op_types(model) == ["QuantizeLinear", op, "DequantizeLinear"]


def test_per_axis_round_trip_on_different_axes_is_not_cancelled():
    # DQ per row (axis 0) then Q per column (axis 1) with the same arrays: not the identity
    s, z = np.array([0.1, 0.2, 0.3, 0.4], np.float32), np.zeros(4, np.uint8)
    nodes = [
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["d"], axis=0, name="dequant"),
        helper.make_node("QuantizeLinear", ["d", "s", "z"], ["y"], axis=1, name="quant"),
    ]
    proto = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x_q", TensorProto.UINT8, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [4, 4])],
        {"s": s, "z": z},
        opset=graphs.QDQ_OPSET,
    )
    model = to_ir(proto)
    MoveQDQPass()(model)
    x_q = (np.arange(16, dtype=np.uint8) * 10).reshape(4, 4)
    np.testing.assert_array_equal(run(model, {"x_q": x_q})[0], run(proto, {"x_q": x_q})[0])


def _dq_into(op_node, inputs, scales, out_shape, extra_inits=None):
    """uint8 inputs → one DQ each (scale from ``scales``, zero 128) → ``op_node`` → y."""
    nodes, inits = [], dict(extra_inits or {})
    for i, (name, scale) in enumerate(zip(inputs, scales)):
        inits[f"s{i}"], inits[f"z{i}"] = np.float32(scale), np.uint8(128)
        nodes.append(helper.make_node("DequantizeLinear", [name, f"s{i}", f"z{i}"], [f"{name}_dq"]))
    nodes.append(op_node)
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info(n, TensorProto.UINT8, [2, 3]) for n in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
        opset=graphs.QDQ_OPSET,
    )


def _u8(seed):
    return np.random.default_rng(seed).integers(0, 256, (2, 3)).astype(np.uint8)


def test_dequantize_sinks_below_gather_so_only_picked_rows_are_converted():
    node = helper.make_node("Gather", ["a_dq", "idx"], ["y"], axis=0)
    proto = _dq_into(node, ["a"], [0.1], [1, 3], {"idx": np.array([1], np.int64)})
    model = to_ir(proto)
    assert MoveQDQPass()(model).modified
    assert op_types(model) == ["Gather", "DequantizeLinear"]
    feed = {"a": _u8(0)}
    np.testing.assert_array_equal(run(model, feed)[0], run(proto, feed)[0])


@pytest.mark.parametrize("arity", [2, 3])
def test_concat_of_equal_grids_becomes_one_dequantize(arity):
    names = ["a", "b", "c"][:arity]
    node = helper.make_node("Concat", [f"{n}_dq" for n in names], ["y"], axis=1)
    proto = _dq_into(node, names, [0.1] * arity, [2, 3 * arity])
    model = to_ir(proto)
    assert MoveQDQPass()(model).modified
    assert op_types(model) == ["Concat", "DequantizeLinear"]
    check(model)
    feed = {n: _u8(i) for i, n in enumerate(names)}
    np.testing.assert_array_equal(run(model, feed)[0], run(proto, feed)[0])
    assert not MoveQDQPass()(model).modified


def test_concat_of_different_grids_is_refused_with_the_reason():
    node = helper.make_node("Concat", ["a_dq", "b_dq"], ["y"], axis=1)
    model = to_ir(_dq_into(node, ["a", "b"], [0.1, 0.2], [2, 6]))
    assert "different scales" in " ".join(_refusals(rules(), model))
    assert not MoveQDQPass()(model).modified
