"""SmoothQuant math (qcompiler.smoothing) and the statistics it reads (TensorStats, RowSample),
checked against numpy references written here."""

import numpy as np
import pytest

from qcompiler import smoothing
from qcompiler.ranges import RowSample, TensorStats, select_range
from qcompiler.smoothing import ChannelRange, Observed


# --- independent references ---------------------------------------------------------------------


def _affine(lo: float, hi: float, levels: int = 255) -> tuple[np.float32, float]:
    """uint8 affine scale and zero point for ``[lo, hi]`` widened to contain 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(levels))
    return scale, float(np.clip(-np.rint(np.float32(lo) / scale), 0, levels))


def _ref_activation(x: np.ndarray, scheme: str, lo=None, hi=None) -> np.ndarray:
    def affine_row(row, lo, hi):
        scale, zero = _affine(lo, hi)
        q = np.clip(np.rint(row / scale) + zero, 0, 255)
        return scale * (q - zero)

    if scheme in ("static", "dynamic"):
        return affine_row(x, float(x.min()) if lo is None else lo, float(x.max()) if hi is None else hi)
    if scheme == "per-token":
        return np.stack([affine_row(r, float(r.min()), float(r.max())) for r in x])
    scale = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    return np.clip(np.rint(x / scale), -127, 127) * scale


def _ref_weight(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w).max(axis=0) / np.float32(127)
    return np.clip(np.rint(w / scale), -127, 127) * scale


def _ref_error(x: np.ndarray, w: np.ndarray, s, scheme: str) -> float:
    """‖XW − Q(X/s) Q(sW)‖² / ‖XW‖² with the static range taken from the rows themselves."""
    s = np.ones(w.shape[0], np.float32) if s is None else s
    xq = _ref_activation(x / s, scheme)  # static: the rows' own range (the tests' ChannelRange is theirs)
    ref = (x @ w).astype(np.float64)
    return float(np.sum((ref - xq @ _ref_weight(w * s[:, None])) ** 2) / np.sum(ref**2))


def _relative_error(*args, **kwargs) -> float:
    error, energy = smoothing.error_terms(*args, **kwargs)
    return error / energy


def _outlier_rows(rows=256, k=64, channels=(5, 40), factor=100.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[:, list(channels)] *= factor
    return x


# --- smoothing_scales -------------------------------------------------------------------------


def test_scales_equal_the_formula():
    rng = np.random.default_rng(0)
    x_absmax = rng.uniform(0.1, 50, 12)
    w_absmax = rng.uniform(0.01, 2, 12)
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        expected = x_absmax**alpha / w_absmax ** (1 - alpha)
        s = smoothing.smoothing_scales(x_absmax, w_absmax, alpha)
        assert s.dtype == np.float32
        np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_alpha_one_flattens_the_activation_channel_maxima():
    x = _outlier_rows(rows=100, k=16, channels=(2, 9))
    x_absmax = np.abs(x).max(axis=0)
    s = smoothing.smoothing_scales(x_absmax, np.full(16, 0.3), 1.0)
    np.testing.assert_allclose(np.abs(x / s).max(axis=0), np.ones(16), rtol=1e-6)
    assert np.abs(x).max(axis=0).max() / np.median(x_absmax) > 20  # it did have outliers


def test_tied_channels_share_one_scale_from_their_maximum():
    x_absmax = np.array([1.0, 4.0, 2.0, 3.0])
    w_absmax = np.array([0.5, 0.2, 0.1, 0.3])
    tied = np.array([0, 0, 1, 1])
    s = smoothing.smoothing_scales(x_absmax, w_absmax, 0.5, tied)
    source0 = 4.0**0.5 / 0.5**0.5  # max over channels 0, 1 of x and of w
    source1 = 3.0**0.5 / 0.3**0.5
    np.testing.assert_allclose(s, [source0, source0, source1, source1], rtol=1e-6)
    # an interleaved map (GQA-like, sources repeated) is read the same way
    s = smoothing.smoothing_scales(x_absmax, w_absmax, 0.5, np.array([0, 1, 0, 1]))
    np.testing.assert_allclose(s, [np.sqrt(2 / 0.5), np.sqrt(4 / 0.3)] * 2, rtol=1e-6)


def test_tied_max_is_the_maximum_over_each_source():
    np.testing.assert_array_equal(
        smoothing.tied_max(np.array([1.0, 7.0, 3.0, 2.0, 5.0]), np.array([2, 0, 2, 0, 2])), [7.0, 0.0, 5.0])


def test_dead_channels_get_a_finite_positive_scale():
    s = smoothing.smoothing_scales(np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.5)
    assert np.all(np.isfinite(s)) and np.all(s > 0)


# --- fake quantization --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["static", "dynamic", "per-token", "per-token-sym"])
def test_activation_round_trip_error_is_at_most_half_a_step(scheme):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(20, 32)) * rng.uniform(0.5, 5, (20, 1))).astype(np.float32)
    lo, hi = (-2.0, 3.0) if scheme == "static" else (None, None)
    out = smoothing.fake_quant_activation(x, scheme, lo, hi)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, _ref_activation(x, scheme, lo, hi), rtol=0, atol=1e-6)
    error = np.abs(out - x)
    if scheme == "per-token-sym":
        step = np.abs(x).max(axis=1, keepdims=True) / 127
        assert np.all(error <= step / 2 * (1 + 1e-5))
        return
    rows = [(lo, hi)] * len(x) if scheme == "static" else (
        [(float(x.min()), float(x.max()))] * len(x) if scheme == "dynamic" else [(r.min(), r.max()) for r in x])
    for row, row_out, (r_lo, r_hi) in zip(x, out, rows):
        step, zero = _affine(r_lo, r_hi)
        grid_lo, grid_hi = -zero * step, (255 - zero) * step  # what uint8 can represent
        inside = (row >= grid_lo) & (row <= grid_hi)
        assert np.all(np.abs(row_out - row)[inside] <= step / 2 * (1 + 1e-5) + 1e-7)
        in_range = (row >= r_lo) & (row <= r_hi)  # the range's ends may lie half a step outside the grid
        assert np.all(np.abs(row_out - row)[in_range] <= step * (1 + 1e-5))
        assert np.all(row_out >= grid_lo - 1e-6) and np.all(row_out <= grid_hi + 1e-6)  # outside: clipped
    if scheme == "static":
        assert np.any(x > hi) and np.isclose(out.max(), grid_hi, atol=1e-6)


@pytest.mark.parametrize("scheme", ["per-token", "per-token-sym"])
def test_per_token_rows_are_quantized_independently(scheme):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 16)).astype(np.float32)
    spiked = x.copy()
    spiked[2, 7] = 500.0
    a, b = smoothing.fake_quant_activation(x, scheme), smoothing.fake_quant_activation(spiked, scheme)
    others = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(a[others], b[others])
    for i in range(len(x)):  # each row as if quantized alone
        np.testing.assert_array_equal(smoothing.fake_quant_activation(spiked[i : i + 1], scheme)[0], b[i])
    # the per-tensor schemes are not per row: the spike coarsens every row
    assert not np.array_equal(smoothing.fake_quant_activation(x, "dynamic")[0],
                              smoothing.fake_quant_activation(spiked, "dynamic")[0])


def test_unknown_scheme_is_rejected():
    with pytest.raises(ValueError, match="unknown"):
        smoothing.fake_quant_activation(np.ones((2, 2), np.float32), "per-channel")


def test_weight_error_is_at_most_half_a_per_output_channel_step():
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(24, 10)) * rng.uniform(0.01, 10, 10)).astype(np.float32)  # [K, N]
    out = smoothing.fake_quant_weight(w)
    step = np.abs(w).max(axis=0) / 127  # per output channel: columns
    assert np.all(np.abs(out - w) <= step / 2 * (1 + 1e-5))
    np.testing.assert_allclose(out, _ref_weight(w), rtol=0, atol=1e-6 * np.abs(w).max())
    np.testing.assert_allclose(np.abs(out).max(axis=0), np.abs(w).max(axis=0), rtol=1e-6)  # the max is exact


# --- ChannelRange, error_terms, search_alpha --------------------------------------------------


def test_channel_range_smoothed_is_the_range_of_x_over_s():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(50, 8)) + rng.normal(0, 3, 8)).astype(np.float32)
    s = rng.uniform(0.1, 10, 8).astype(np.float32)
    channels = ChannelRange(x.min(axis=0), x.max(axis=0))
    lo, hi = channels.smoothed(s)
    assert lo == pytest.approx(float((x / s).min()), rel=1e-6)
    assert hi == pytest.approx(float((x / s).max()), rel=1e-6)
    np.testing.assert_array_equal(channels.absmax, np.abs(x).max(axis=0))


@pytest.mark.parametrize("scheme", ["static", "per-token", "per-token-sym"])
def test_relative_error_equals_the_reference(scheme):
    x = _outlier_rows(rows=64, k=32, channels=(3,), seed=5)
    w = np.random.default_rng(6).normal(0, 0.2, (32, 12)).astype(np.float32)
    channels = ChannelRange(x.min(axis=0), x.max(axis=0))
    s = smoothing.smoothing_scales(channels.absmax, np.abs(w).max(axis=1), 0.5)
    for scales in (None, s):
        assert _relative_error(x, w, scales, scheme, channels) == pytest.approx(
            _ref_error(x, w, scales, scheme), rel=1e-3)


def test_search_finds_an_alpha_that_removes_outlier_error():
    x = _outlier_rows()
    w = np.random.default_rng(7).normal(0, 0.2, (64, 32)).astype(np.float32)
    channels = ChannelRange(x.min(axis=0), x.max(axis=0))
    choice = smoothing.search_alpha(Observed(x, channels), w, "static")
    assert choice.alpha is not None and choice.alpha in smoothing.ALPHA_GRID
    assert choice.unsmoothed_error >= 5 * choice.error
    assert choice.gain == pytest.approx(choice.unsmoothed_error / choice.error)
    np.testing.assert_allclose(
        choice.scales, smoothing.smoothing_scales(channels.absmax, np.abs(w).max(axis=1), choice.alpha), rtol=1e-6)
    # the errors it reports are the real ones, and the chosen alpha is the best of the grid
    assert choice.unsmoothed_error == pytest.approx(_ref_error(x, w, None, "static"), rel=1e-3)
    assert choice.error == pytest.approx(_ref_error(x, w, choice.scales, "static"), rel=1e-3)
    others = [_ref_error(x, w, smoothing.smoothing_scales(channels.absmax, np.abs(w).max(axis=1), a), "static")
              for a in smoothing.ALPHA_GRID]
    assert choice.error <= min(others) * (1 + 1e-3)


def test_search_never_makes_even_activations_worse():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(256, 64)).astype(np.float32)
    w = rng.normal(0, 0.2, (64, 32)).astype(np.float32)
    channels = ChannelRange(x.min(axis=0), x.max(axis=0))
    choice = smoothing.search_alpha(Observed(x, channels), w, "per-token")
    assert choice.error <= choice.unsmoothed_error
    assert choice.unsmoothed_error == pytest.approx(_ref_error(x, w, None, "per-token"), rel=1e-3)
    if choice.alpha is None:
        assert choice.scales is None and choice.gain == 1.0


def test_a_one_element_grid_is_applied_whatever_the_error():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(128, 32)).astype(np.float32)
    w = rng.normal(0, 0.2, (32, 16)).astype(np.float32)
    x[:, :4] *= 0.01  # α near 0 (s ≈ 1/max|W|) gives these near-dead channels a range they do not need
    channels = ChannelRange(x.min(axis=0), x.max(axis=0))
    choice = smoothing.search_alpha(Observed(x, channels), w, "static", grid=(0.05,))
    assert choice.alpha == 0.05
    assert choice.error > 1.2 * choice.unsmoothed_error  # applied although worse
    np.testing.assert_allclose(
        choice.scales, smoothing.smoothing_scales(channels.absmax, np.abs(w).max(axis=1), 0.05), rtol=1e-6)
    searched = smoothing.search_alpha(Observed(x, channels), w, "static", grid=(0.05, 0.1))  # a real choice: none
    assert searched.alpha is None and searched.error == searched.unsmoothed_error and searched.scales is None


def test_search_with_tied_channels_returns_tied_scales():
    x = _outlier_rows(rows=128, k=8, channels=(1,))
    w = np.random.default_rng(10).normal(0, 0.2, (8, 6)).astype(np.float32)
    tied = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    choice = smoothing.search_alpha(Observed(x, ChannelRange(x.min(axis=0), x.max(axis=0))), w, "static", tied=tied)
    assert choice.alpha is not None
    np.testing.assert_array_equal(choice.scales[:4], choice.scales[4:])


def test_cross_validated_search_fits_on_one_fold_and_measures_on_the_other():
    a = _outlier_rows(rows=64, k=16, channels=(3,), seed=11)
    b = _outlier_rows(rows=64, k=16, channels=(3,), seed=12)
    b[5, 3] = 4 * np.abs(a[:, 3]).max()  # a spike fold a never saw: clipped by a's range
    w = np.random.default_rng(13).normal(0, 0.2, (16, 6)).astype(np.float32)
    folds = [Observed(x, ChannelRange(x.min(axis=0), x.max(axis=0))) for x in (a, b)]
    w_absmax = np.abs(w).max(axis=1)

    def terms(fit, held, alpha):
        s = smoothing.smoothing_scales(np.abs(fit).max(axis=0), w_absmax, alpha)
        xq = _ref_activation(held / s, "static", float((fit / s).min()), float((fit / s).max()))
        ref = (held @ w).astype(np.float64)
        return np.sum((ref - xq @ _ref_weight(w * s[:, None])) ** 2), np.sum(ref**2)

    for alpha in (0.3, 0.8):
        choice = smoothing.search_alpha(folds, w, "static", grid=(alpha,))
        (e1, r1), (e2, r2) = terms(a, b, alpha), terms(b, a, alpha)
        assert choice.error == pytest.approx((e1 + e2) / (r1 + r2), rel=1e-3)
        assert e1 > 10 * e2  # the unseen spike is what the cross-validation charges
        np.testing.assert_allclose(choice.scales, smoothing.smoothing_scales(
            np.maximum(np.abs(a).max(axis=0), np.abs(b).max(axis=0)), w_absmax, alpha), rtol=1e-6)
    assert smoothing.merged_range(folds).hi[3] == b[5, 3]


def test_outlier_ratio_is_max_over_median():
    assert smoothing.outlier_ratio(np.array([1.0, 2.0, 3.0, 100.0])) == pytest.approx(40.0)
    assert smoothing.outlier_ratio(np.array([2.0, 2.0, 2.0])) == pytest.approx(1.0)
    assert smoothing.outlier_ratio(np.zeros(0)) == 0.0
    x = _outlier_rows()
    assert smoothing.outlier_ratio(np.abs(x).max(axis=0)) > 20


# --- RowSample and TensorStats --------------------------------------------------------------------


def _numbered_rows(n: int, width: int = 3) -> np.ndarray:
    """Row ``i`` holds ``i`` in every column: a kept row names its position in the stream."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], width, axis=1)


def _stream(sample: RowSample, rows: np.ndarray, sizes) -> RowSample:
    start = 0
    for size in sizes:
        sample.update(rows[start : start + size])
        start += size
    assert start == len(rows)
    return sample


def test_row_sample_keeps_capacity_distinct_input_rows():
    rows = _numbered_rows(200)
    sample = _stream(RowSample(50), rows, [40] * 5).sample
    assert sample.shape == (50, 3)
    ids = sample[:, 0]
    assert np.all(sample == ids[:, None])  # each kept row is one whole input row
    assert set(ids) <= set(range(200)) and len(set(ids)) == 50
    assert ids.max() >= 50  # later rows do replace early ones


def test_row_sample_is_deterministic_and_any_batching_gives_its_size():
    rows = _numbered_rows(200)
    a = _stream(RowSample(50), rows, [40] * 5).sample
    b = _stream(RowSample(50), rows, [40] * 5).sample
    np.testing.assert_array_equal(a, b)
    for sizes in ([7, 93, 100], [1] * 200, [200]):
        other = _stream(RowSample(50), rows, sizes).sample
        assert other.shape == (50, 3) and len(set(other[:, 0])) == 50 and set(other[:, 0]) <= set(range(200))


def test_row_sample_keeps_everything_in_order_when_it_fits():
    rows = np.random.default_rng(11).normal(size=(30, 4)).astype(np.float32)
    np.testing.assert_array_equal(_stream(RowSample(64), rows, [5, 0, 12, 13]).sample, rows)
    np.testing.assert_array_equal(_stream(RowSample(30), rows, [30]).sample, rows)
    assert RowSample(8).sample.shape == (0, 0)


def test_row_sample_is_uniform_over_the_stream():
    rows = _numbered_rows(100, width=1)
    counts = np.zeros(100)
    for seed in range(300):
        counts[_stream(RowSample(10, seed=seed), rows, [10] * 10).sample[:, 0].astype(int)] += 1
    # each row is kept with probability 10/100: 30 times in expectation over 300 streams
    assert abs(counts[:50].sum() - counts[50:].sum()) < 0.1 * counts.sum()
    assert counts.min() > 10 and counts.max() < 55


def test_row_sample_rejects_a_change_of_width():
    sample = RowSample(4)
    sample.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="width"):
        sample.update(np.zeros((2, 5)))


def test_stats_without_histogram_still_give_exact_extremes():
    rng = np.random.default_rng(12)
    batches = [(rng.normal(size=(2, 5, 6)) * rng.uniform(0.1, 30, 6)).astype(np.float32) for _ in range(3)]
    stats = TensorStats(histogram=False, keep_rows=100)
    for b in batches:
        stats.update(b)
    rows = np.concatenate([b.reshape(-1, 6) for b in batches])
    assert stats.min == rows.min() and stats.max == rows.max()
    np.testing.assert_array_equal(stats.channel_min, rows.min(axis=0))
    np.testing.assert_array_equal(stats.channel_max, rows.max(axis=0))
    np.testing.assert_array_equal(stats.channel_absmax, np.abs(rows).max(axis=0))
    assert not stats.hist.any()
    assert select_range(stats, "minmax").hi == rows.max()
    np.testing.assert_array_equal(stats.rows.sample, rows)  # 30 rows < 100: all of them, in order


def test_stats_rows_sample_positions_and_skip_non_finite_rows():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    x[1, 0, 2] = np.nan
    stats = TensorStats(keep_rows=8)
    stats.update(x)
    np.testing.assert_array_equal(stats.rows.sample, x.reshape(-1, 4)[[0, 1, 2, 4, 5]])
    assert stats.rows.seen == 5
    assert TensorStats().rows is None


def test_stats_rows_follow_the_channel_axis():
    x = np.random.default_rng(13).normal(size=(2, 3, 4, 4)).astype(np.float32)  # NCHW, C = 3
    stats = TensorStats(channel_axis=1, keep_rows=64, histogram=False)
    stats.update(x)
    np.testing.assert_array_equal(stats.rows.sample, np.moveaxis(x, 1, -1).reshape(-1, 3))
    np.testing.assert_array_equal(stats.channel_max, x.max(axis=(0, 2, 3)))


def _spiky_rows(n: int = 20000, spikes: int = 20, seed: int = 12) -> np.ndarray:
    """Gaussian rows, ``spikes`` of them ×100 (sink tokens): they carry most of Σ‖row‖²."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, 8)).astype(np.float32)
    rows[rng.choice(n, spikes, replace=False)] *= 100.0
    return rows


def test_heavy_rows_are_the_largest_exactly_and_weights_add_up_to_the_stream():
    rows = _spiky_rows()
    sample = _stream(RowSample(256, heavy=64), rows, [512] * 39 + [20000 - 512 * 39])
    peaks = np.abs(rows).max(axis=1)
    np.testing.assert_array_equal(sample.heavy, rows[np.argsort(-peaks, kind="stable")[:64]])
    kept, weights = sample.weighted()
    assert weights.sum() == pytest.approx(len(rows)) and len(kept) == len(weights)
    assert np.all(np.abs(kept[64:]).max(axis=1) < peaks[np.argsort(-peaks)[63]])  # no heavy row twice


def test_weighted_rows_estimate_a_sum_the_uniform_sample_misses():
    heavy_errors, uniform_errors = [], []
    for seed in range(10):
        rows = _spiky_rows(seed=100 + seed)
        truth = float(np.square(rows, dtype=np.float64).sum())
        sample = _stream(RowSample(256, seed=seed, heavy=64), rows, [1000] * 20)
        kept, weights = sample.weighted()
        heavy_errors.append(abs(weights @ np.square(kept, dtype=np.float64).sum(axis=1) / truth - 1))
        uniform = sample.sample
        uniform_errors.append(abs(len(rows) / len(uniform) * np.square(uniform, dtype=np.float64).sum() / truth - 1))
    assert max(heavy_errors) < 0.02 < np.median(uniform_errors)


def test_row_weights_count_a_row_as_that_many_copies():
    x, w = _outlier_rows()[:40], np.random.default_rng(13).normal(size=(64, 6)).astype(np.float32)
    channels = ChannelRange(x.min(axis=0), x.max(axis=0))
    weights = np.ones(40)
    weights[:5] = 3.0
    repeated = np.concatenate([x, x[:5], x[:5]])
    for scheme in ("static", "per-token"):  # per-token: rows are quantized alone, copies change nothing
        got = _relative_error(x, w, None, scheme, channels, row_weights=weights)
        assert got == pytest.approx(_relative_error(repeated, w, None, scheme, channels), rel=1e-6)
