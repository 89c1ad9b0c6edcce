import numpy as np
import pytest
from onnx import numpy_helper

from passes.precompute_bias import PrecomputeBiasPass
from qcompiler import ir_utils
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir

CASES = {
    "conv": dict(op="Conv"),
    "gemm_transB_alpha_beta": dict(op="Gemm", trans_b=1, alpha=0.5, beta=2.0),
    "gemm_alpha_beta": dict(op="Gemm", trans_b=0, alpha=1.5, beta=0.25),
    "matmul_add": dict(op="MatMul"),
    "add_matmul": dict(op="MatMul", bias_first=True),  # Add(bias, MatMul(...))
}


def _init(proto, name):
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def _feed(model, seed=0):
    shape = [int(d) for d in model.graph.inputs[0].shape]
    return {"x": (np.random.default_rng(seed).normal(size=shape) * 1.5).astype(np.float32)}


def _bias_dq(model):
    """The DequantizeLinear nodes whose quantized input is a constant int32 tensor."""
    found = []
    for node in model.graph:
        q = ir_utils.constant_array(node.inputs[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.dtype == np.int32:
            found.append(node)
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_bias_becomes_int32_on_the_accumulator_grid(case):
    kw = CASES[case]
    proto = graphs.qdq_linear(**kw)
    model = to_ir(proto)
    bias_pass = PrecomputeBiasPass()
    assert bias_pass(model).modified
    assert bias_pass.summary == "1 biases as int32"
    check(model)

    # the bias input of the op (or of the bias Add) is now DQ(int32 b^q, s_x·s_w·alpha)
    (dq,) = _bias_dq(model)
    reader = next(iter(dq.outputs[0].uses()))[0]
    assert reader.op_type == {"Conv": "Conv", "Gemm": "Gemm", "MatMul": "Add"}[kw["op"]]
    assert "b" not in [v.name for n in model.graph for v in n.inputs if v is not None]  # float bias unread
    alpha, beta = kw.get("alpha", 1.0), kw.get("beta", 1.0)
    s_x, s_w, b = _init(proto, "x_s"), _init(proto, "w_s"), _init(proto, "b")
    grid = np.float64(s_x) * s_w.astype(np.float64) * alpha
    b_q = ir_utils.constant_array(dq.inputs[0])
    np.testing.assert_array_equal(b_q, np.rint(beta * b.astype(np.float64) / grid).astype(np.int32))
    np.testing.assert_allclose(ir_utils.constant_array(dq.inputs[1]), grid, rtol=1e-6)
    assert dq.attributes.get_int("axis") == 0
    if kw["op"] == "Gemm":
        assert reader.attributes.get_float("beta") == 1.0  # beta folded into b^q
        assert reader.attributes.get_float("alpha") == alpha

    # numbers: the int32 bias moves each output by at most half a grid step
    feed = _feed(model)
    got, expected = run(model, feed)[0], run(proto, feed)[0]
    channel_axis = 1  # Conv: NCHW; Gemm/MatMul: [B, N]
    step = grid.reshape([-1] + [1] * (got.ndim - channel_axis - 1))
    assert np.all(np.abs(got.astype(np.float64) - expected) <= step / 2 * (1 + 1e-4) + 1e-6)
    assert not np.array_equal(got, expected)  # the bias really changed

    assert not PrecomputeBiasPass()(model).modified  # an int32 bias is left alone
    assert len(_bias_dq(model)) == 1


def test_matmul_read_twice_is_left_alone():
    model = to_ir(graphs.qdq_linear("MatMul", second_reader=True))
    before = op_types(model)
    assert not PrecomputeBiasPass()(model).modified
    assert op_types(model) == before and not _bias_dq(model)


@pytest.mark.parametrize(
    "proto",
    [
        pytest.param(graphs.conv(), id="float-activation"),  # no DequantizeLinear in front
        pytest.param(graphs.qdq_linear("Conv", x_scale=[0.05, 0.1, 0.2], x_zero=0), id="per-axis-activation"),
        pytest.param(graphs.qdq_linear("Conv", bias=False), id="no-bias"),
        pytest.param(graphs.qdq_linear("MatMul", bias=False), id="matmul-output-is-graph-output"),
    ],
)
def test_ops_without_a_quantized_bias_slot_are_left_alone(proto):
    model = to_ir(proto)
    before = op_types(model)
    assert not PrecomputeBiasPass()(model).modified
    assert op_types(model) == before


def test_bias_too_large_for_int32_stays_float():
    proto = graphs.qdq_linear("Conv")
    bias = next(t for t in proto.graph.initializer if t.name == "b")
    bias.CopyFrom(numpy_helper.from_array(np.full(8, 1e9, np.float32), "b"))
    model = to_ir(proto)
    assert not PrecomputeBiasPass()(model).modified
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[2].name == "b"
