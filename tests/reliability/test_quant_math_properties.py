"""Property tests (hypothesis) of the quantization math in ``qcompiler.quant_math``: round trip
within half a step inside the range, zero exact, clamping outside it, monotonicity, and ragged
group/block edges equal to a naive per-block loop."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompiler import quant_math as qm

SETTINGS = settings(max_examples=60, deadline=None)

QTYPES = st.sampled_from([qm.IntType(b, s) for b in (2, 3, 4, 8) for s in (True, False)])
FINITE = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
ARRAYS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9), elements=FINITE)


def _step_tolerance(scale) -> np.ndarray:
    """Half a step, plus float32 rounding of x/s and s·(q−z) (a few ulps of the values)."""
    return np.asarray(scale, np.float64) * (0.5 + 1e-5)


def _per_tensor(x: np.ndarray, qtype: qm.IntType, symmetric: bool):
    lo, hi = np.float32(x.min()), np.float32(x.max())
    scale, zero = qm.range_params(lo, hi, qtype, symmetric)
    return scale, zero


@SETTINGS
@given(ARRAYS, QTYPES, st.booleans())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(x, qtype, symmetric):
    scale, zero = _per_tensor(x, qtype, symmetric)
    if symmetric and qtype.signed is False:
        return  # symmetric needs a signed type (range_params gives z = 0)
    q = qm.quantize(x, scale, zero, qtype)
    r = qm.dequantize(q, scale, zero)
    lo = float(scale) * (qtype.qmin - float(zero))
    hi = float(scale) * (qtype.qmax - float(zero))
    inside = (x >= lo) & (x <= hi)
    err = np.abs(r.astype(np.float64) - x.astype(np.float64))
    assert np.all(err[inside] <= _step_tolerance(scale) + 1e-6 * np.abs(x[inside]))
    # The representable range covers the data up to half a step (a rounded zero point moves
    # it by at most that): so every value, inside or not, is within half a step.
    assert np.all(err <= _step_tolerance(scale) + 1e-6 * np.abs(x)), (err.max(), scale)


@SETTINGS
@given(ARRAYS, QTYPES, st.booleans())
def test_zero_is_exact(x, qtype, symmetric):
    if symmetric and not qtype.signed:
        return
    scale, zero = _per_tensor(x, qtype, symmetric)
    q0 = qm.quantize(np.zeros(3, np.float32), scale, zero, qtype)
    assert np.all(qm.dequantize(q0, scale, zero) == 0.0)
    assert np.all(q0 == zero)


@SETTINGS
@given(ARRAYS, QTYPES, st.floats(1.5, 1e3))
def test_values_beyond_the_range_clamp_to_the_integer_limits(x, qtype, factor):
    scale, zero = _per_tensor(x, qtype, symmetric=False)
    big = np.array([float(scale) * (qtype.qmax - float(zero)) * factor + 1.0], np.float32)
    small = np.array([float(scale) * (qtype.qmin - float(zero)) * factor - 1.0], np.float32)
    assert qm.quantize(big, scale, zero, qtype)[0] == qtype.qmax
    assert qm.quantize(small, scale, zero, qtype)[0] == qtype.qmin
    q = qm.quantize(x * np.float32(factor), scale, zero, qtype)
    assert q.min() >= qtype.qmin and q.max() <= qtype.qmax and q.dtype == qtype.numpy_dtype


@SETTINGS
@given(ARRAYS, QTYPES)
def test_quantize_is_monotonic(x, qtype):
    scale, zero = _per_tensor(x, qtype, symmetric=False)
    order = np.argsort(x.ravel(), kind="stable")
    q = qm.quantize(x.ravel()[order], scale, zero, qtype).astype(np.int64)
    assert np.all(np.diff(q) >= 0)


@SETTINGS
@given(st.floats(1e-10, 1e30), QTYPES)
def test_symmetric_scale_maps_amax_to_qmax(amax, qtype):
    if not qtype.signed:
        return
    assume(amax >= qtype.qmax * float(qm.MIN_SCALE))  # below it the scale is floored at MIN_SCALE
    scale = qm.symmetric_scale(np.float32(amax), qtype)
    q = qm.quantize(np.array([amax, -amax], np.float32), scale, 0, qtype)
    assert q[0] == qtype.qmax and q[1] == -qtype.qmax
    assert qm.symmetric_scale(np.float32(0.0), qtype) == qm.MIN_SCALE  # all-zero: a valid scale


def _naive_block_reduce(x: np.ndarray, block, reduce) -> np.ndarray:
    shape = tuple(math.ceil(n / b) for n, b in zip(x.shape, block))
    out = np.empty(shape, x.dtype)
    for index in np.ndindex(*shape):
        sl = tuple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, block, x.shape))
        out[index] = reduce(x[sl])
    return out


BLOCK_CASES = st.tuples(ARRAYS, st.data())


@SETTINGS
@given(BLOCK_CASES)
def test_block_reduce_matches_a_naive_loop_with_ragged_edges(case):
    x, data = case
    block = tuple(data.draw(st.integers(1, n + 3)) for n in x.shape)  # blocks may exceed the dim
    block = tuple(min(b, n) if b > n + 1 else b for b, n in zip(block, x.shape))
    np.testing.assert_array_equal(qm.block_reduce(x, block, np.maximum), _naive_block_reduce(x, block, np.max))
    np.testing.assert_array_equal(qm.block_reduce(x, block, np.minimum), _naive_block_reduce(x, block, np.min))
    params = qm.block_reduce(x, block, np.maximum)
    assert params.shape == qm.param_shape(x.shape, block)
    expanded = qm.expand_params(params, block, x.shape)
    assert expanded.shape == x.shape and np.all(expanded >= x)


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 6)), elements=FINITE),
       st.integers(1, 48), st.sampled_from([2, 3, 4, 8]), st.booleans())
def test_group_quantization_round_trip_per_group(w, group, bits, symmetric):
    """``WeightFormat`` groups along K (rows), ragged last group included, group > K too."""
    fmt = qm.WeightFormat(bits=bits, group_size=group, symmetric=symmetric)
    qt = fmt.quantize(w)
    k, n = w.shape
    assert qt.scale.shape == (math.ceil(k / min(group, k)), n)
    scale = qm.expand_params(qt.scale, qt.block, w.shape)
    err = np.abs(qt.dequantize().astype(np.float64) - w)
    assert np.all(err <= _step_tolerance(scale) + 1e-6 * np.abs(w)), err.max()
    # Each group's own extremes set its scale: a group of zeros dequantizes to exact zeros.
    w_zero = w.copy()
    w_zero[: min(group, k)] = 0.0
    assert np.all(fmt.quantize(w_zero).dequantize()[: min(group, k)] == 0.0)


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=FINITE),
       st.integers(0, 1))
def test_per_axis_scale_is_per_channel_and_independent(w, axis):
    qt = qm.quantize_tensor(w, qm.PerAxis(axis), qm.INT8, symmetric=True)
    amax = np.abs(w).max(axis=1 - axis)
    expected = np.maximum(amax / np.float32(127), qm.MIN_SCALE)
    np.testing.assert_allclose(qt.scale.ravel(), expected, rtol=1e-6)
    # Scaling one channel leaves every other channel's integers unchanged.
    w2 = w.copy()
    index = [slice(None)] * 2
    index[axis] = 0
    w2[tuple(index)] *= 3
    qt2 = qm.quantize_tensor(w2, qm.PerAxis(axis), qm.INT8, symmetric=True)
    rest = [slice(None)] * 2
    rest[axis] = slice(1, None)
    np.testing.assert_array_equal(qt.q[tuple(rest)], qt2.q[tuple(rest)])


@SETTINGS
@given(st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=8), st.floats(1e-4, 1.0), st.floats(1e-4, 1.0))
def test_bias_to_int32_is_round_half_even_on_the_grid(bias_steps, s_x, s_w):
    grid = np.float64(np.float32(s_x)) * np.float64(np.float32(s_w))
    bias = np.asarray(bias_steps, np.float64) * grid
    q = qm.bias_to_int32(bias, np.float32(s_x), np.float32(s_w))
    np.testing.assert_array_equal(q, np.asarray(bias_steps, np.int32))
