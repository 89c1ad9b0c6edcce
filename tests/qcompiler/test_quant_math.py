import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompiler import quant_math as qm


def _loop_block_absmax(x, block):
    """Independent reference: absmax of every block by explicit loops."""
    shape = qm.param_shape(x.shape, block)
    out = np.zeros(shape, np.float32)
    for idx in itertools.product(*(range(n) for n in shape)):
        sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))
        out[idx] = np.abs(x[sl]).max()
    return out


@pytest.mark.parametrize(
    "granularity, shape",
    [
        (qm.PerTensor(), (6, 10)),
        (qm.PerAxis(0), (6, 10)),
        (qm.PerAxis(1), (6, 10)),
        (qm.PerAxis(-1), (2, 3, 4)),
        (qm.PerGroup(4, axis=0), (12, 5)),
        (qm.PerGroup(5, axis=0), (12, 5)),  # ragged last group
        (qm.PerGroup(128, axis=0), (12, 5)),  # group larger than the axis
    ],
)
def test_block_reduce_matches_loops(granularity, shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    block = granularity.block_size(shape)
    np.testing.assert_array_equal(qm.block_reduce(np.abs(x), block, np.maximum), _loop_block_absmax(x, block))


def test_block_sizes():
    assert qm.PerTensor().block_size((4, 6)) == (4, 6)
    assert qm.PerAxis(1).block_size((4, 6)) == (4, 1)
    assert qm.PerGroup(2, axis=0).block_size((4, 6)) == (2, 1)
    assert qm.param_shape((5, 6), (2, 1)) == (3, 6)


def test_rounding_is_half_to_even_like_onnx():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)
    q = qm.quantize(x, np.float32(1.0), 0, qm.INT8)
    np.testing.assert_array_equal(q, [0, 2, 2, 0, -2])


def _onnx_qdq(x, scale, zero, axis=None, block_size=None):
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    zt = TensorProto.INT8 if zero.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("q", zt, x.shape), helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ReferenceEvaluator(model).run(None, {"x": x})


def test_per_axis_matches_onnx_reference():
    x = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
    t = qm.quantize_tensor(x, qm.PerAxis(1), qm.INT8)
    q, y = _onnx_qdq(x, t.scale.reshape(-1), t.zero_point.reshape(-1), axis=1)
    np.testing.assert_array_equal(t.q, q)
    np.testing.assert_array_equal(t.dequantize(), y)


def test_per_group_matches_onnx_blocked_reference():
    x = np.random.default_rng(2).normal(size=(8, 6)).astype(np.float32)
    t = qm.quantize_tensor(x, qm.PerGroup(4, axis=0), qm.UINT8, symmetric=False)
    q, y = _onnx_qdq(x, t.scale, t.zero_point, axis=0, block_size=4)
    np.testing.assert_array_equal(t.q, q)
    np.testing.assert_allclose(t.dequantize(), y, rtol=0, atol=1e-6)


def test_affine_params_contain_zero_exactly():
    scale, zero = qm.affine_params(np.float32(0.5), np.float32(3.0), qm.UINT8)
    assert zero == 0  # range widened to [0, 3]
    assert qm.dequantize(qm.quantize(np.zeros(1, np.float32), scale, zero, qm.UINT8), scale, zero)[0] == 0.0
    scale, zero = qm.affine_params(np.float32(-1.0), np.float32(3.0), qm.UINT8)
    np.testing.assert_allclose(scale, 4.0 / 255)
    assert zero == round(1.0 / (4.0 / 255))


def test_all_zero_tensor_gets_a_valid_scale():
    t = qm.quantize_tensor(np.zeros((3, 4), np.float32), qm.PerAxis(0))
    assert np.all(t.scale > 0) and np.all(t.q == 0)


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9), elements=finite),
       st.booleans())
def test_round_trip_error_at_most_half_a_step(x, symmetric):
    t = qm.quantize_tensor(x, qm.PerAxis(0), qm.INT8 if symmetric else qm.UINT8, symmetric=symmetric)
    step = qm.expand_params(t.scale, t.block, x.shape)
    assert np.all(np.abs(t.dequantize() - x) <= step / 2 * (1 + 1e-5) + 1e-30)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.integers(2, 50), elements=finite))
def test_quantize_is_monotonic_and_clamps(x):
    scale = np.float32(max(np.abs(x).max(), 1e-3) / 64)  # a range narrower than the data
    q = qm.quantize(np.sort(x), scale, 0, qm.INT8)
    assert np.all(np.diff(q.astype(int)) >= 0)
    assert q.min() >= -128 and q.max() <= 127


def test_sqnr_and_cosine():
    x = np.array([3.0, 4.0])
    assert qm.sqnr_db(x, x + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert qm.sqnr_db(x, x) == float("inf")
    assert qm.cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]))[0] == pytest.approx(0.0)
