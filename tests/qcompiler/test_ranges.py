import numpy as np
import pytest

from qcompiler import quant_math as qm
from qcompiler.ranges import TensorStats, select_range


def _stats(*batches):
    s = TensorStats()
    for b in batches:
        s.update(np.asarray(b, np.float32))
    return s


def test_streaming_histogram_equals_one_shot_histogram():
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 0.1, 1000), rng.normal(0, 3.0, 1000), rng.normal(0, 40, 50)]
    s = _stats(*batches)  # the range grows twice: bins merge
    everything = np.concatenate(batches).astype(np.float32)
    ref, _ = np.histogram(everything, bins=s.bins, range=(-s.half_width, s.half_width))
    # merged histograms can differ from a direct one only by values sitting on a bin edge
    assert np.abs(s.hist - ref).sum() <= 2
    assert s.count == everything.size
    assert s.min == everything.min() and s.max == everything.max()


def test_order_of_batches_does_not_matter():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 0.5, 500), rng.normal(0, 20, 500)
    np.testing.assert_array_equal(_stats(a, b).hist, _stats(b, a).hist)


def test_non_finite_values_are_ignored_and_channels_tracked():
    s = _stats(np.array([[1.0, -5.0], [np.inf, 2.0], [np.nan, 0.5]]))
    assert s.count == 4 and s.max == 2.0 and s.min == -5.0
    np.testing.assert_array_equal(s.channel_absmax, [1.0, 5.0])  # inf/nan ignored per element


def test_minmax_is_exact():
    r = select_range(_stats([-2.0, 0.0, 7.5]), "minmax")
    assert (r.lo, r.hi) == (-2.0, 7.5)


def test_percentile_matches_numpy_within_a_bin():
    x = np.random.default_rng(2).normal(0, 1, 200_000).astype(np.float32)
    s = _stats(x)
    r = select_range(s, "percentile", percentile=99.9)
    width = 2 * s.half_width / s.bins
    assert abs(r.hi - np.percentile(x, 99.9)) <= 2 * width
    assert abs(r.lo - np.percentile(x, 0.1)) <= 2 * width


def _affine_mse(x, r):
    scale, zero = qm.affine_params(np.float32(r.lo), np.float32(r.hi), qm.UINT8)
    return float(np.mean((qm.dequantize(qm.quantize(x, scale, zero, qm.UINT8), scale, zero) - x) ** 2))


def _heavy_tailed():
    rng = np.random.default_rng(3)
    return np.concatenate([rng.normal(0, 1, 100_000), [200.0, -150.0]]).astype(np.float32)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_clipping_methods_resolve_the_bulk_better_than_minmax(method):
    x = _heavy_tailed()
    s = _stats(x)
    r = select_range(s, method)
    assert r.hi < 200.0 and r.lo > -150.0  # the two outliers are clipped
    bulk = x[np.abs(x) < 4]
    assert _affine_mse(bulk, r) < 0.05 * _affine_mse(bulk, select_range(s, "minmax"))


def test_mse_range_minimises_total_error():
    x = _heavy_tailed()
    s = _stats(x)
    chosen = _affine_mse(x, select_range(s, "mse"))
    for other in ("minmax", "percentile", "entropy"):
        assert chosen <= _affine_mse(x, select_range(s, other)) * 1.01
    # without outliers MSE clips a Gaussian's tails: better than min-max
    g = np.random.default_rng(6).normal(0, 1, 100_000).astype(np.float32)
    sg = _stats(g)
    assert _affine_mse(g, select_range(sg, "mse")) < _affine_mse(g, select_range(sg, "minmax"))


def test_entropy_keeps_a_range_without_outliers():
    x = np.random.default_rng(4).uniform(-1, 1, 50_000).astype(np.float32)
    r = select_range(_stats(x), "entropy")
    assert r.hi > 0.9 and r.lo < -0.9


def test_non_negative_tensor_stays_non_negative():
    x = np.abs(np.random.default_rng(5).normal(0, 1, 10_000)).astype(np.float32)
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert select_range(_stats(x), method).lo >= 0.0


def test_no_values_is_an_error():
    with pytest.raises(ValueError):
        select_range(TensorStats(), "minmax")
