"""AWQ math (qcompiler.awq): scale search, clipping search, and both, on synthetic layers whose
activations have a few salient input channels, checked against RTN and numpy references."""

import math

import numpy as np
import pytest

from qcompiler import awq
from qcompiler import quant_math as qm

SALIENT = {3: 30.0, 70: 50.0, 150: 80.0, 201: 100.0}  # input channel -> activation magnitude
FORMATS = [
    qm.WeightFormat(4, 128, symmetric=True),
    qm.WeightFormat(4, 128, symmetric=False),
    qm.WeightFormat(4, 32, symmetric=True),
    qm.WeightFormat(4, 32, symmetric=False),
    qm.WeightFormat(4, None, symmetric=True),
    qm.WeightFormat(4, None, symmetric=False),
    qm.WeightFormat(3, 128, symmetric=True),
    qm.WeightFormat(3, 128, symmetric=False),
]


def _salient_rows(rows: int = 256, k: int = 256, seed: int = 0) -> np.ndarray:
    """Gaussian activations with the ``SALIENT`` channels 30–100× larger than the rest (those
    below ``k``; for ``k = 64``: channels 3 and 63)."""
    x = np.random.default_rng(seed).normal(size=(rows, k)).astype(np.float32)
    for channel, factor in SALIENT.items():
        x[:, channel if channel < k else k - 1] *= factor
    return x


def _weight(k: int = 256, n: int = 48, seed: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.05, size=(k, n)).astype(np.float32)


def _fmt_id(fmt: qm.WeightFormat) -> str:
    groups = f"g{fmt.group_size}" if fmt.group_size else "ch"
    return f"int{fmt.bits}-{groups}-{'sym' if fmt.symmetric else 'asym'}"


# --- independent references --------------------------------------------------------------------


def _ref_block_quant(v: np.ndarray, lo: float, hi: float, fmt: qm.WeightFormat) -> np.ndarray:
    """One block ``v`` quantized over ``[lo, hi]`` and dequantized, written out per formula."""
    qmin, qmax = fmt.qtype.qmin, fmt.qtype.qmax
    if fmt.symmetric:
        scale = max(np.float32(max(abs(lo), abs(hi))) / np.float32(qmax), np.float32(1e-12))
        zero = np.float32(0)
    else:
        lo, hi = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
        scale = max((hi - lo) / np.float32(qmax - qmin), np.float32(1e-12))
        zero = np.float32(np.clip(qmin - np.rint(lo / scale), qmin, qmax))
    q = np.clip(np.rint(v / np.float32(scale)) + zero, qmin, qmax)
    return np.float32(scale) * (q - zero)


def _ref_quant(w: np.ndarray, fmt: qm.WeightFormat, ratio=None) -> np.ndarray:
    """RTN (or, with ``ratio[g, n]``, the clipped range) of ``W`` block by block, in loops."""
    k, n = w.shape
    g = fmt.group_size or k
    out = np.empty_like(w)
    for gi, start in enumerate(range(0, k, g)):
        for col in range(n):
            v = w[start : start + g, col]
            r = np.float32(1.0 if ratio is None else ratio[gi, col])
            out[start : start + g, col] = _ref_block_quant(v, r * v.min(), r * v.max(), fmt)
    return out


def _ref_error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    x, w, w_hat = (a.astype(np.float64) for a in (x, w, w_hat))
    return float(np.sum((x @ w - x @ w_hat) ** 2) / np.sum((x @ w) ** 2))


def _ref_group_errors(x: np.ndarray, delta: np.ndarray, g: int) -> np.ndarray:
    x, delta = x.astype(np.float64), delta.astype(np.float64)
    return np.stack(
        [np.sum((x[:, s : s + g] @ delta[s : s + g]) ** 2, axis=0) for s in range(0, x.shape[1], g)]
    )


# --- AWQ against RTN ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_awq_output_error_is_far_below_rtn_with_salient_channels(fmt):
    x, w = _salient_rows(seed=0), _weight()
    result = awq.awq_quantize(x, w, fmt)

    assert result.rtn_error == pytest.approx(_ref_error(x, w, _ref_quant(w, fmt)), rel=1e-4)
    assert 0.0 < result.alpha < 1.0
    # measured (3 seeds): AWQ/RTN 0.03–0.18 on the search rows and on fresh rows
    assert result.scaled_error < 0.3 * result.rtn_error
    assert result.clipped_error < result.scaled_error  # measured 0.49–0.91 of scaled
    assert result.clipped_error < 0.25 * result.rtn_error
    held_out = _salient_rows(seed=1)
    rtn = awq.output_error(held_out, w, fmt.quantize(w).dequantize())
    assert awq.output_error(held_out, w, result.effective_weight()) < 0.25 * rtn


def test_salient_channels_get_the_largest_scales():
    choice = awq.search_scales(_salient_rows(), _weight(), qm.WeightFormat(4, 128))
    salient = sorted(SALIENT)
    assert choice.alpha > 0.0 and choice.gain > 3.0
    assert np.argsort(choice.scales)[-len(salient) :].tolist() == salient  # ordered by magnitude


def test_scale_search_matches_a_reference_objective():
    x, w = _salient_rows(rows=96, k=64, seed=3), _weight(k=64, n=12)
    fmt = qm.WeightFormat(4, 16, symmetric=False)
    grid = (0.0, 0.2, 0.4, 0.6, 0.8)
    choice = awq.search_scales(x, w, fmt, grid)

    mean = np.abs(x.astype(np.float64)).mean(axis=0)
    reference = []
    for alpha in grid:
        s = np.maximum(mean**alpha, 1e-4)
        s = (s / math.sqrt(s.max() * s.min())).astype(np.float32)
        reference.append(_ref_error(x, w, _ref_quant(w * s[:, None], fmt) / s[:, None]))
    assert choice.alpha == grid[int(np.argmin(reference))]
    assert choice.error == pytest.approx(min(reference), rel=1e-4)
    assert choice.rtn_error == pytest.approx(reference[0], rel=1e-4)


def test_awq_scales_formula():
    mean = np.array([0.0, 1e-9, 0.5, 2.0, 40.0])
    np.testing.assert_array_equal(awq.awq_scales(mean, 0.0), np.ones(5, np.float32))
    s = awq.awq_scales(mean, 0.5)
    expected = np.maximum(mean**0.5, 1e-4)
    np.testing.assert_allclose(s, expected / math.sqrt(expected.max() * expected.min()), rtol=1e-6)
    assert s.dtype == np.float32 and np.all(np.isfinite(s)) and np.all(s > 0)
    assert float(s.max()) * float(s.min()) == pytest.approx(1.0, rel=1e-6)  # centred on 1


# --- α = 0 is RTN --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS[:2] + FORMATS[4:6], ids=_fmt_id)
def test_zero_alpha_and_unit_ratio_are_rtn_exactly(fmt):
    x, w = _salient_rows(rows=64), _weight()
    choice = awq.search_scales(x, w, fmt, grid=(0.0,))
    assert choice.alpha == 0.0 and choice.error == choice.rtn_error
    np.testing.assert_array_equal(choice.scales, np.ones(w.shape[0], np.float32))

    result = awq.awq_quantize(x, w, fmt, grid=(0.0,), ratios=(1.0,))
    rtn = fmt.quantize(w)
    for field in ("q", "scale", "zero_point"):
        np.testing.assert_array_equal(getattr(result.quantized, field), getattr(rtn, field))
    assert result.quantized.block == rtn.block
    np.testing.assert_array_equal(result.quantized.ratio, 1.0)
    assert result.rtn_error == result.scaled_error == result.clipped_error


def test_ties_go_to_the_smaller_alpha():
    x = _salient_rows(rows=32, k=64)
    zero = np.zeros((64, 8), np.float32)  # XW = 0: every α has error 0
    choice = awq.search_scales(x, zero, qm.WeightFormat(4, 32), grid=(0.6, 0.3, 0.9))
    assert choice.alpha == 0.3 and choice.error == 0.0


# --- x_mean_abs --------------------------------------------------------------------------------


def test_x_mean_abs_replaces_the_rows_mean():
    x_all = _salient_rows(rows=512, seed=5)
    rows, w, fmt = x_all[::8], _weight(), qm.WeightFormat(4, 128)

    own = awq.search_scales(rows, w, fmt)
    explicit = awq.search_scales(rows, w, fmt, x_mean_abs=np.abs(rows).mean(axis=0, dtype=np.float64))
    assert explicit.alpha == own.alpha and explicit.error == own.error
    np.testing.assert_array_equal(explicit.scales, own.scales)

    mean_all = np.abs(x_all).mean(axis=0)  # over all calibration rows, not just the sampled ones
    choice = awq.search_scales(rows, w, fmt, x_mean_abs=mean_all)
    np.testing.assert_array_equal(choice.scales, awq.awq_scales(mean_all, choice.alpha))
    assert choice.error == pytest.approx(
        awq.output_error(rows, w, awq.scaled_rtn(w, choice.scales, fmt)), rel=1e-6
    )

    # a statistic that says another channel is salient moves the scales there
    other = np.ones(256)
    other[40] = 100.0
    fixed = awq.awq_quantize(rows, w, fmt, grid=(0.5,), x_mean_abs=other)
    assert int(np.argmax(fixed.scales)) == 40
    np.testing.assert_array_equal(fixed.scales, awq.awq_scales(other, 0.5))


def test_x_mean_abs_is_validated():
    x, w, fmt = _salient_rows(rows=16, k=64), _weight(k=64, n=4), qm.WeightFormat(4, 32)
    with pytest.raises(ValueError, match="x_mean_abs"):
        awq.search_scales(x, w, fmt, x_mean_abs=np.ones(63))
    with pytest.raises(ValueError, match="x_mean_abs"):
        awq.search_scales(x, w, fmt, x_mean_abs=-np.ones(64))


# --- quantize_with_range -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,k",
    [(f, 256) for f in FORMATS]
    + [(qm.WeightFormat(4, 64, symmetric=False), 200), (qm.WeightFormat(4, 64, symmetric=True), 200)]
    + [(qm.WeightFormat(8, 128, symmetric=False), 256), (qm.WeightFormat(2, 16, symmetric=True), 40)],
    ids=lambda p: _fmt_id(p) if isinstance(p, qm.WeightFormat) else f"K{p}",
)
def test_quantize_with_block_min_max_equals_rtn_exactly(fmt, k):
    w = _weight(k=k, n=20, seed=k)
    w[:, 3] = np.abs(w[:, 3])  # a column without negatives: affine widens to 0 the same way
    w[:, 4] = 0.0  # a constant-zero column: MIN_SCALE
    lo, hi = awq.block_range(w, fmt)
    got, rtn = awq.quantize_with_range(w, fmt, lo, hi), fmt.quantize(w)
    for field in ("q", "scale", "zero_point"):
        np.testing.assert_array_equal(getattr(got, field), getattr(rtn, field))
        assert getattr(got, field).dtype == getattr(rtn, field).dtype
    assert got.block == rtn.block
    np.testing.assert_array_equal(got.dequantize(), _ref_quant(w, fmt))


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_shrunk_range_clips_to_the_integer_limits(symmetric):
    fmt = qm.WeightFormat(4, 16, symmetric)
    w = _weight(k=64, n=8, seed=2)
    lo, hi = awq.block_range(w, fmt)
    got = awq.quantize_with_range(w, fmt, np.float32(0.5) * lo, np.float32(0.5) * hi)
    qt = fmt.qtype
    assert got.q.min() == qt.qmin and got.q.max() == qt.qmax  # the block extremes now clip
    ratio = np.full(lo.shape, 0.5, np.float32)
    np.testing.assert_array_equal(got.dequantize(), _ref_quant(w, fmt, ratio))
    with pytest.raises(ValueError, match="parameter shape"):
        awq.quantize_with_range(w, fmt, lo[:1], hi)


# --- clipping search ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_clipping_never_increases_a_blocks_error(fmt):
    rng = np.random.default_rng(7)
    x = _salient_rows(rows=128, seed=7)
    w = (0.03 * rng.standard_t(3, size=(256, 24))).astype(np.float32)
    clipped, rtn = awq.search_clipping(x, w, fmt), fmt.quantize(w)

    before = awq.group_errors(x, w - rtn.dequantize(), fmt.group_size)
    after = awq.group_errors(x, w - clipped.dequantize(), fmt.group_size)
    assert np.all(after <= before * (1 + 1e-9))
    assert after.sum() < before.sum()
    assert set(np.unique(clipped.ratio)) <= set(np.float32(awq.CLIP_RATIOS))
    assert np.any(clipped.ratio < 1.0)
    np.testing.assert_array_equal(clipped.dequantize(), _ref_quant(w, fmt, clipped.ratio))


def test_clipping_picks_each_blocks_best_ratio():
    x, w = _salient_rows(rows=40, k=64, seed=8), _weight(k=64, n=6, seed=8)
    fmt, ratios = qm.WeightFormat(3, 16, symmetric=False), (1.0, 0.9, 0.8, 0.7, 0.6)
    clipped = awq.search_clipping(x, w, fmt, ratios)
    errors = np.stack(
        [
            _ref_group_errors(x, w - _ref_quant(w, fmt, np.full((4, 6), r, np.float32)), 16)
            for r in ratios
        ]
    )
    candidates = np.float32(ratios).tolist()
    chosen = np.array([candidates.index(r) for r in clipped.ratio.ravel().tolist()]).reshape(4, 6)
    best = errors.min(axis=0)
    np.testing.assert_allclose(np.take_along_axis(errors, chosen[None], 0)[0], best, rtol=1e-5)


@pytest.mark.parametrize(
    "fmt", [FORMATS[0], FORMATS[1], FORMATS[4], qm.WeightFormat(3, 64)], ids=_fmt_id
)
@pytest.mark.parametrize("weights", ["laplace", "student-t"])
def test_clipping_helps_heavy_tailed_weights(fmt, weights):
    rng = np.random.default_rng(21)
    shape = (256, 48)
    w = rng.laplace(0, 0.05, shape) if weights == "laplace" else 0.03 * rng.standard_t(3, shape)
    w = w.astype(np.float32)
    x, held_out = (rng.normal(size=(512, 256)).astype(np.float32) for _ in range(2))
    clipped, rtn = awq.search_clipping(x, w, fmt).dequantize(), fmt.quantize(w).dequantize()
    # measured (3 seeds): 0.63–0.92 of RTN's error on the search rows, 0.67–0.96 on fresh rows
    assert awq.output_error(x, w, clipped) < 0.94 * awq.output_error(x, w, rtn)
    assert awq.output_error(held_out, w, clipped) < 0.97 * awq.output_error(held_out, w, rtn)


def test_unit_ratio_alone_is_rtn():
    x, w, fmt = _salient_rows(rows=32), _weight(), qm.WeightFormat(4, 128)
    clipped, rtn = awq.search_clipping(x, w, fmt, ratios=(1.0,)), fmt.quantize(w)
    np.testing.assert_array_equal(clipped.q, rtn.q)
    np.testing.assert_array_equal(clipped.scale, rtn.scale)
    np.testing.assert_array_equal(clipped.zero_point, rtn.zero_point)


@pytest.mark.parametrize("rows", [16, 300])  # direct form (n ≤ 2g) and Gram form (n > 2g)
@pytest.mark.parametrize("group_size,k", [(64, 256), (48, 200), (None, 96)])
def test_group_errors_match_a_reference(rows, group_size, k):
    rng = np.random.default_rng(rows + k)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    delta = rng.normal(0, 1e-2, size=(k, 10)).astype(np.float32)
    got = awq.group_errors(x, delta, group_size)
    assert got.shape == (math.ceil(k / (group_size or k)), 10) and got.dtype == np.float64
    np.testing.assert_allclose(got, _ref_group_errors(x, delta, group_size or k), rtol=1e-5)


# --- shapes, dtypes, folding, validation -------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS[:2] + FORMATS[4:5] + [qm.WeightFormat(3, 64)], ids=_fmt_id)
def test_result_shapes_dtypes_and_ranges(fmt):
    k, n = 200, 24  # K not a multiple of the group: a ragged last group
    x, w = _salient_rows(rows=96, k=k), _weight(k=k, n=n)
    result = awq.awq_quantize(x, w, fmt)
    qt, groups = result.quantized, math.ceil(k / (fmt.group_size or k))

    assert isinstance(qt, qm.QuantizedTensor) and isinstance(qt, awq.ClippedTensor)
    assert qt.q.shape == (k, n) and qt.q.dtype == fmt.qtype.numpy_dtype
    assert fmt.qtype.qmin <= qt.q.min() and qt.q.max() <= fmt.qtype.qmax
    assert qt.scale.shape == qt.zero_point.shape == qt.ratio.shape == (groups, n)
    assert qt.scale.dtype == qt.ratio.dtype == np.float32 and np.all(qt.scale > 0)
    assert qt.block == fmt.block((k, n))
    if fmt.symmetric:
        assert not qt.zero_point.any()
    assert result.scales.shape == (k,) and result.scales.dtype == np.float32
    assert np.all(result.scales > 0) and np.all(np.isfinite(result.scales))

    # the caller's folding: (X/s) · Q(diag(s) W) is what the errors describe
    folded = (x / result.scales) @ qt.dequantize()
    np.testing.assert_allclose(folded, x @ result.effective_weight(), rtol=1e-4, atol=1e-4)
    assert result.clipped_error == pytest.approx(_ref_error(x, w, result.effective_weight()), rel=1e-4)
    assert result.gain == pytest.approx(result.rtn_error / result.clipped_error)


def test_bad_inputs_are_refused():
    x, w, fmt = _salient_rows(rows=8, k=64), _weight(k=64, n=4), qm.WeightFormat(4, 32)
    with pytest.raises(ValueError, match="x_rows"):
        awq.awq_quantize(x[:, :63], w, fmt)
    with pytest.raises(ValueError, match="alpha grid"):
        awq.search_scales(x, w, fmt, grid=())
    with pytest.raises(ValueError, match="alpha grid"):
        awq.search_scales(x, w, fmt, grid=(1.5,))
    with pytest.raises(ValueError, match="clipping ratios"):
        awq.search_clipping(x, w, fmt, ratios=(1.0, 0.0))


def test_default_grids():
    assert awq.ALPHA_GRID[0] == 0.0 and awq.ALPHA_GRID[-1] == 0.95 and len(awq.ALPHA_GRID) == 20
    assert awq.CLIP_RATIOS[0] == 1.0 and awq.CLIP_RATIOS[-1] == 0.5 and len(awq.CLIP_RATIOS) == 21
