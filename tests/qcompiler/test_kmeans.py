import numpy as np
import pytest

from qcompiler import quant_math as qm
from qcompiler.kmeans import Codebook, kmeans_quantize


def _weights(dist: str, shape=(1024, 32), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (getattr(rng, dist)(size=shape) * 0.02).astype(np.float32)


def _column_mse(w, w_hat):
    return np.mean((w.astype(np.float64) - w_hat) ** 2, axis=0)


def _lloyd_reference(column: np.ndarray, levels: int, iterations: int) -> np.ndarray:
    """Independent reference for one codebook: argmin assignment and np.mean, loop by loop."""
    x = column.astype(np.float64)
    c = np.linspace(x.min(), x.max(), levels)
    assign = None
    for _ in range(iterations):
        new = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(levels):
            if np.any(assign == j):
                c[j] = x[assign == j].mean()
    return c


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_kmeans_beats_its_start_and_rtn(bits, dist):
    w = _weights(dist)
    kmeans = kmeans_quantize(w, bits, per_channel=True).decode()
    start = kmeans_quantize(w, bits, per_channel=True, iterations=0).decode()
    # Lloyd never increases the error of any codebook (slack: float32 rounding of centroids).
    assert np.all(_column_mse(w, kmeans) <= _column_mse(w, start) * (1 + 1e-6) + 1e-18)
    rtn = qm.WeightFormat(bits, None, symmetric=False).quantize(w).dequantize()
    ratio = _column_mse(w, kmeans).mean() / _column_mse(w, rtn).mean()
    assert ratio < 0.85  # measured 0.30 (2-bit normal) .. 0.78 (8-bit Laplace)


@pytest.mark.parametrize("bits", [2, 4])
def test_per_tensor_beats_its_start(bits):
    w = _weights("laplace", (256, 16))
    kmeans, start = kmeans_quantize(w, bits, False), kmeans_quantize(w, bits, False, iterations=0)
    assert np.mean((w - kmeans.decode()) ** 2) <= np.mean((w - start.decode()) ** 2) * (1 + 1e-6)


def test_start_is_the_min_max_grid():
    w = _weights("normal", (64, 5))
    cb = kmeans_quantize(w, 3, per_channel=True, iterations=0)
    expected = w.min(axis=0)[:, None] + (w.max(axis=0) - w.min(axis=0))[:, None] * (np.arange(8) / 7)
    np.testing.assert_allclose(cb.centroids, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits", [2, 4])
def test_matches_loop_reference(bits):
    w = _weights("normal", (200, 6), seed=3)
    cb = kmeans_quantize(w, bits, per_channel=True, iterations=25)
    for n in range(w.shape[1]):
        expected = _lloyd_reference(w[:, n], 1 << bits, 25)
        np.testing.assert_allclose(cb.centroids[n], expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_indices_are_in_range_and_nearest(bits, per_channel):
    w = _weights("laplace", (300, 7), seed=1)
    cb = kmeans_quantize(w, bits, per_channel)
    assert cb.indices.dtype == np.uint8 and cb.indices.shape == w.shape
    assert cb.indices.max() < 1 << bits
    assert cb.centroids.dtype == np.float32
    assert cb.centroids.shape == ((7 if per_channel else 1), 1 << bits)
    assert cb.bits == bits and cb.per_channel == per_channel
    # Every weight uses its nearest centroid (brute force over the table).
    table = cb.centroids if per_channel else np.repeat(cb.centroids, w.shape[1], axis=0)
    distance = np.abs(w.T[:, :, None].astype(np.float64) - table[:, None, :])  # [N, K, levels]
    chosen = np.take_along_axis(distance, cb.indices.T[:, :, None].astype(np.intp), axis=2)[..., 0]
    np.testing.assert_array_equal(chosen, distance.min(axis=2))


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 3])
def test_exact_when_few_distinct_values(bits, per_channel):
    rng = np.random.default_rng(2)
    levels = 1 << bits
    values = rng.normal(size=(levels, 6)).astype(np.float32)
    # Lloyd from the uniform grid would leave two clusters empty and merge 0, 0.1, 0.2.
    values[:, 0] = [0.0, 0.1, 0.2, 10.0] + [10.0] * (levels - 4)
    if per_channel:
        w = values[rng.integers(0, levels, size=(100, 6)), np.arange(6)]
        w[:, 1] = values[rng.integers(0, 2, size=100), 1]  # fewer distinct values than levels
    else:
        w = rng.choice(values[:, 2], size=(50, 4))
    cb = kmeans_quantize(w, bits, per_channel)
    np.testing.assert_array_equal(cb.decode(), w)


def test_constant_columns():
    w = _weights("normal", (64, 4))
    w[:, 1] = 0.0
    w[:, 2] = -1.5
    cb = kmeans_quantize(w, 4, per_channel=True)
    np.testing.assert_array_equal(cb.decode()[:, 1:3], w[:, 1:3])
    assert np.all(cb.indices[:, 1:3] == 0)
    constant = kmeans_quantize(np.full((8, 3), 2.5, np.float32), 2, per_channel=False)
    np.testing.assert_array_equal(constant.decode(), 2.5)
    assert not constant.indices.any()


def test_negative_zero_and_ties():
    w = np.array([[-0.0, 0.0, -1.0, 1.0, 0.5, -0.5]], np.float32).T
    cb = kmeans_quantize(w, 1, per_channel=True, iterations=0)  # centroids -1, 1; ties at 0 go low
    np.testing.assert_array_equal(cb.decode()[:, 0], [-1, -1, -1, 1, 1, -1])


@pytest.mark.parametrize("per_channel", [True, False])
def test_deterministic(per_channel):
    w = _weights("laplace", (256, 8))
    a, b = kmeans_quantize(w, 3, per_channel), kmeans_quantize(w.copy(), 3, per_channel)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_chunked_columns_equal_unchunked(monkeypatch):
    from qcompiler import kmeans

    w = _weights("normal", (128, 40))
    whole = kmeans_quantize(w, 3, True)
    monkeypatch.setattr(kmeans, "_CHUNK_ELEMENTS", 128 * 7)  # 7 columns per chunk, ragged end
    chunked = kmeans_quantize(w, 3, True)
    np.testing.assert_array_equal(whole.indices, chunked.indices)
    np.testing.assert_array_equal(whole.centroids, chunked.centroids)


def test_rejects_bad_input():
    w = _weights("normal", (8, 2))
    with pytest.raises(ValueError):
        kmeans_quantize(w, 9, True)
    with pytest.raises(ValueError):
        kmeans_quantize(w[0], 4, True)
    with pytest.raises(ValueError):
        kmeans_quantize(np.array([[np.nan]], np.float32), 4, True)
    with pytest.raises(ValueError):
        Codebook(np.zeros((4, 3), np.uint8), np.zeros((2, 16), np.float32))  # 2 codebooks, 3 columns
    with pytest.raises(ValueError):
        Codebook(np.zeros((4, 3), np.uint8), np.zeros((3, 5), np.float32))  # not 2^b centroids
