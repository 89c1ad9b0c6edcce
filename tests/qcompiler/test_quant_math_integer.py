"""The integer linear-op math (bias on the accumulator grid, zero-point folding, requantization)
against independent references: Python integers and Python's own half-even ``round``."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler import quant_math as qm

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# --- bias_to_int32 ---------------------------------------------------------------------------


def test_bias_to_int32_rounds_half_to_even():
    # grid = 0.5 · 1 exactly, so b / grid lands exactly on the halves
    bias = np.array([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 0.3], np.float32)
    got = qm.bias_to_int32(bias, np.float32(0.5), np.float32(1.0))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [0, 2, 2, 0, -2, -2, 1])


def test_bias_to_int32_per_channel_matches_python_round():
    rng = np.random.default_rng(0)
    bias = rng.normal(0, 1, 16).astype(np.float32)
    x_scale, w_scale = np.float32(0.037), rng.uniform(0.001, 0.01, 16).astype(np.float32)
    expected = [round(float(b) / (float(x_scale) * float(s))) for b, s in zip(bias, w_scale)]
    np.testing.assert_array_equal(qm.bias_to_int32(bias, x_scale, w_scale), expected)


@pytest.mark.parametrize("value", [float(INT32_MAX), float(INT32_MIN)])
def test_bias_to_int32_accepts_the_int32_limits(value):
    assert int(qm.bias_to_int32(np.array([value]), 1.0, 1.0)[0]) == int(value)


@pytest.mark.parametrize("value", [float(INT32_MAX) + 1, float(INT32_MIN) - 1, 1e12])
def test_bias_to_int32_overflow_is_an_error(value):
    with pytest.raises(OverflowError, match="int32"):
        qm.bias_to_int32(np.array([0.0, value]), 1.0, 1.0)


def test_bias_to_int32_overflow_from_a_tiny_grid():
    with pytest.raises(OverflowError):
        qm.bias_to_int32(np.array([1.0], np.float32), np.float32(1e-6), np.float32(1e-6))


# --- integer_matmul and fold_zero_point ------------------------------------------------------


def _python_matmul(x_q, x_zero, w_q, bias_q):
    """Σ_k (x^q − z_x) W^q[k, n] + b^q[n] with Python integers."""
    rows, inner = x_q.shape
    cols = w_q.shape[1]
    return [
        [sum((int(x_q[m, k]) - x_zero) * int(w_q[k, n]) for k in range(inner)) + int(bias_q[n]) for n in range(cols)]
        for m in range(rows)
    ]


def test_integer_matmul_matches_python_integers():
    rng = np.random.default_rng(1)
    x_q = rng.integers(0, 256, (3, 7)).astype(np.uint8)
    w_q = rng.integers(-128, 128, (7, 5)).astype(np.int8)
    b_q = rng.integers(-(2**20), 2**20, 5).astype(np.int32)
    got = qm.integer_matmul(x_q, 77, w_q, b_q)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _python_matmul(x_q, 77, w_q, b_q))
    np.testing.assert_array_equal(qm.integer_matmul(x_q, 77, w_q), _python_matmul(x_q, 77, w_q, np.zeros(5)))


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 4),
    k=st.integers(1, 40),
    n=st.integers(1, 6),
    x_zero=st.integers(0, 255),
    seed=st.integers(0, 2**32 - 1),
)
def test_folded_zero_point_gives_the_same_accumulator(m, k, n, x_zero, seed):
    """Σ x^q W^q + (b^q − z_x ΣW^q) = Σ (x^q − z_x) W^q + b^q, exactly."""
    rng = np.random.default_rng(seed)
    x_q = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w_q = rng.integers(-128, 128, (k, n)).astype(np.int8)
    b_q = rng.integers(-(2**24), 2**24, n).astype(np.int32)
    folded = qm.fold_zero_point(b_q, x_zero, w_q, (0,))
    assert folded.dtype == np.int32
    np.testing.assert_array_equal(
        qm.integer_matmul(x_q, 0, w_q, folded), qm.integer_matmul(x_q, x_zero, w_q, b_q)
    )


def test_fold_zero_point_over_conv_input_axes():
    rng = np.random.default_rng(2)
    w_q = rng.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8)
    b_q = rng.integers(-1000, 1000, 4).astype(np.int32)
    expected = [int(b) - 131 * sum(int(v) for v in w_q[c].ravel()) for c, b in enumerate(b_q)]
    np.testing.assert_array_equal(qm.fold_zero_point(b_q, 131, w_q, (1, 2, 3)), expected)


def test_fold_zero_point_overflow_is_an_error():
    w_q = np.full((64, 2), 127, np.int8)  # z_x · ΣW^q = 255 · 8128 ≈ 2.07e6
    b_q = np.array([INT32_MIN + 10, 0], np.int32)
    with pytest.raises(OverflowError, match="int32"):
        qm.fold_zero_point(b_q, 255, w_q, (0,))


# --- requantize ------------------------------------------------------------------------------


def _python_requantize(acc, multiplier, zero, qtype):
    """Python's round is half-to-even on float64."""
    return [
        min(max(round(float(a) * float(mult)) + zero, qtype.qmin), qtype.qmax)
        for a, mult in zip(acc, multiplier)
    ]


@pytest.mark.parametrize("qtype, zero", [(qm.UINT8, 128), (qm.UINT8, 0), (qm.INT8, 0), (qm.IntType(4, False), 8)])
def test_requantize_matches_a_float64_reference(qtype, zero):
    rng = np.random.default_rng(3)
    acc = rng.integers(-40_000, 40_000, 500).astype(np.int64)
    multiplier = rng.uniform(1e-4, 1e-2, 500).astype(np.float32)
    got = qm.requantize(acc, multiplier, zero, qtype)
    assert got.dtype == qtype.numpy_dtype
    np.testing.assert_array_equal(got, _python_requantize(acc, multiplier, zero, qtype))
    assert got.min() == qtype.qmin and got.max() == qtype.qmax  # both ends saturate here


def test_requantize_rounds_half_to_even_and_saturates():
    acc = np.array([5, 7, -5, -7, 10**9, -(10**9)], np.int64)
    got = qm.requantize(acc, np.array(0.5), 100, qm.UINT8)
    np.testing.assert_array_equal(got, [102, 104, 98, 96, 255, 0])
    got = qm.requantize(acc, np.array(0.5), 0, qm.INT8)
    np.testing.assert_array_equal(got, [2, 4, -2, -4, 127, -128])


def test_requantize_per_channel_multiplier_broadcasts_over_rows():
    acc = np.arange(-12, 12, dtype=np.int64).reshape(4, 6)
    multiplier = np.linspace(0.1, 0.6, 6)
    got = qm.requantize(acc, multiplier, 3, qm.INT8)
    expected = [_python_requantize(row, multiplier, 3, qm.INT8) for row in acc]
    np.testing.assert_array_equal(got, expected)
