"""Streaming activation statistics and the choice of a quantization range from them (numpy).

``TensorStats`` is updated batch by batch and never keeps the activations: exact min/max, the
per-channel min/max (for SmoothQuant) and mean (for bias correction) along a channel axis (the
last one for MatMul inputs, 1 for NCHW convs), and a histogram over ``[-R, R]`` whose
half-width ``R`` is a power of two. When a batch exceeds ``R``, ``R`` doubles and adjacent bin
pairs merge, so the histogram stays exact (no re-interpolation) whatever the order of batches.

Ranges (seed 004, "Dynamic Range for Activation Quantization"):

* ``minmax``: ``[min, max]`` as observed;
* ``percentile``: clip to the ``p``-th percentile at both ends;
* ``entropy``: the symmetric threshold ``T`` minimising ``KL(P ‖ Q)`` between the histogram of
  ``|x|`` clipped at ``T`` and its quantization to ``2^(bits-1)`` levels (TensorRT's method;
  the bin at zero is left out, since zeros quantize exactly);
* ``mse``: the range minimising the expected squared error of affine ``bits``-bit
  quantization of the histogram's mass.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qcompiler import quant_math as qm

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 4096


class TensorStats:
    """Streaming statistics of one activation tensor."""

    def __init__(
        self, bins: int = DEFAULT_BINS, channel_axis: int = -1, keep_rows: int = 0, histogram: bool = True,
        heavy_rows: int = 0,
    ) -> None:
        if bins % 4:
            raise ValueError("bins must be a multiple of 4")
        self.bins = bins
        self.channel_axis = channel_axis
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.half_width = 0.0  # R: the histogram covers [-R, R]
        self.hist = np.zeros(bins, np.int64)
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None
        self._channel_sum: np.ndarray | None = None
        self._channel_count: np.ndarray | None = None
        # keep_rows > 0: also a uniform sample of that many rows (positions × channels), and
        # the heavy_rows rows of largest |x| (RowSample.weighted).
        self.rows = RowSample(keep_rows, heavy=heavy_rows) if keep_rows else None
        self.histogram = histogram  # False: min/max and channel statistics only (cheaper)

    def update(self, x: np.ndarray) -> None:
        """Fold a batch of values in. Non-finite values are ignored (counted nowhere)."""
        x = np.asarray(x, np.float32)
        if x.ndim and x.size:
            rows = np.moveaxis(x, self.channel_axis, -1).reshape(-1, x.shape[self.channel_axis])
            self._update_channels(rows)
            if self.rows is not None:
                self.rows.update(rows[np.isfinite(rows).all(axis=1)])
        flat = x.ravel()
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        self.count += flat.size
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        if not self.histogram:
            return
        self._grow_to(max(-self.min, self.max))
        width = 2.0 * self.half_width / self.bins
        index = np.floor((flat.astype(np.float64) + self.half_width) / width).astype(np.int64)
        self.hist += np.bincount(np.clip(index, 0, self.bins - 1), minlength=self.bins)

    def _update_channels(self, rows: np.ndarray) -> None:
        """``rows``: ``[n, channels]``. A channel axis whose size changes between batches is not
        a channel axis: the per-channel statistics are then dropped (empty)."""
        finite = np.isfinite(rows)
        lo = np.where(finite, rows, np.inf).min(axis=0)
        hi = np.where(finite, rows, -np.inf).max(axis=0)
        total = np.where(finite, rows, 0.0).sum(axis=0, dtype=np.float64)
        count = finite.sum(axis=0)
        if self.channel_min is None:
            self.channel_min, self.channel_max, self._channel_sum, self._channel_count = lo, hi, total, count
        elif self.channel_min.shape != lo.shape or not self.channel_min.size:
            self.channel_min = self.channel_max = np.zeros(0, np.float32)
            self._channel_sum = self._channel_count = np.zeros(0)
        else:
            np.minimum(self.channel_min, lo, out=self.channel_min)
            np.maximum(self.channel_max, hi, out=self.channel_max)
            self._channel_sum += total
            self._channel_count += count

    @property
    def channel_absmax(self) -> np.ndarray | None:
        """``max|x|`` of each channel (0 for a channel that never held a finite value)."""
        if self.channel_min is None:
            return None
        absmax = np.maximum(np.abs(self.channel_min), np.abs(self.channel_max))
        return np.where(np.isfinite(absmax), absmax, 0.0).astype(np.float32)

    @property
    def channel_mean(self) -> np.ndarray | None:
        """Mean of each channel over every observed position (None before any batch)."""
        if self._channel_sum is None:
            return None
        return (self._channel_sum / np.maximum(self._channel_count, 1)).astype(np.float32)

    def _grow_to(self, amax: float) -> None:
        if self.half_width == 0.0:
            self.half_width = 2.0 ** math.ceil(math.log2(max(amax, 2.0**-40)))
            return
        while amax > self.half_width:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            quarter = self.bins // 4
            self.hist = np.zeros_like(self.hist)
            self.hist[quarter : quarter + merged.size] = merged
            self.half_width *= 2.0

    @property
    def bin_centers(self) -> np.ndarray:
        width = 2.0 * self.half_width / self.bins
        return -self.half_width + width * (np.arange(self.bins) + 0.5)

    def to_dict(self) -> dict:
        """A JSON-friendly summary (for reports)."""
        return {"count": self.count, "min": self.min, "max": self.max}


class RowSample:
    """A uniform random sample of at most ``capacity`` rows (``[n, channels]`` batches) from a
    stream, by reservoir sampling with a fixed seed: the same stream gives the same sample, and
    memory is ``capacity × channels`` however long the stream is.

    ``heavy > 0``: also the ``heavy`` rows of largest ``max_j |x_j|`` exactly (``weighted``).
    Sums over rows — a layer's output error — are dominated by the few rows with outliers (an
    attention-sink token), which a uniform sample of a long stream holds by luck or not at all."""

    def __init__(self, capacity: int, seed: int = 0, heavy: int = 0) -> None:
        self.capacity, self.heavy_capacity = capacity, heavy
        self.seen = 0
        self.rows: np.ndarray | None = None
        self.heavy: np.ndarray | None = None  # [≤ heavy, channels], largest peak first
        self._heavy_peaks = np.zeros(0, np.float32)
        self._rng = np.random.default_rng(seed)

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float32)
        if rows.ndim != 2 or rows.shape[0] == 0:
            return
        if self.rows is None:
            self.rows = np.empty((self.capacity, rows.shape[1]), np.float32)
        if rows.shape[1] != self.rows.shape[1]:
            raise ValueError(f"row width changed from {self.rows.shape[1]} to {rows.shape[1]}")
        index = self.seen + np.arange(rows.shape[0])
        fill = index < self.capacity
        self.rows[index[fill]] = rows[fill]
        slots = self._rng.integers(0, index + 1)  # row t replaces slot j < capacity w.p. cap/(t+1)
        for row, slot in zip(np.flatnonzero(~fill & (slots < self.capacity)), slots[~fill & (slots < self.capacity)]):
            self.rows[slot] = rows[row]
        self.seen += rows.shape[0]
        if self.heavy_capacity:
            self._update_heavy(rows)

    def _update_heavy(self, rows: np.ndarray) -> None:
        pool = rows if self.heavy is None else np.concatenate([self.heavy, rows])
        peaks = np.concatenate([self._heavy_peaks, np.abs(rows).max(axis=1)])
        keep = np.argsort(-peaks, kind="stable")[: self.heavy_capacity]
        self.heavy, self._heavy_peaks = pool[keep], peaks[keep]

    def weighted(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, weights)`` such that ``Σ weights_i f(rows_i)`` estimates ``Σ f`` over every
        row seen: the heavy rows count once each (they are exact); the uniform sample's rows
        below the smallest heavy peak stand for the other ``seen − heavy`` rows, each weighted
        ``(seen − heavy) / their number``. Without heavy rows: the uniform sample, weights 1."""
        uniform = self.sample
        if not self.heavy_capacity or self.heavy is None:
            return uniform, np.ones(len(uniform))
        if self.seen <= self.heavy_capacity:  # every row seen is a heavy one
            return self.heavy, np.ones(len(self.heavy))
        rest = uniform[np.abs(uniform).max(axis=1) < self._heavy_peaks[-1]]
        weight = (self.seen - len(self.heavy)) / max(len(rest), 1)
        return (np.concatenate([self.heavy, rest]),
                np.concatenate([np.ones(len(self.heavy)), np.full(len(rest), weight)]))

    @property
    def sample(self) -> np.ndarray:
        """The sampled rows ``[min(seen, capacity), channels]``."""
        if self.rows is None:
            return np.zeros((0, 0), np.float32)
        return self.rows[: min(self.seen, self.capacity)]


@dataclasses.dataclass(frozen=True)
class Range:
    lo: float
    hi: float


def select_range(
    stats: TensorStats,
    method: str = "minmax",
    bits: int = 8,
    percentile: float = 99.999,
) -> Range:
    """The quantization range of one tensor by ``method`` (see the module docstring)."""
    if stats.count == 0:
        raise ValueError("no finite values were observed for this tensor")
    if method == "minmax":
        return Range(stats.min, stats.max)
    if method == "percentile":
        return _percentile_range(stats, percentile)
    if method == "entropy":
        return _entropy_range(stats, bits)
    if method == "mse":
        return _mse_range(stats, bits)
    raise ValueError(f"unknown calibration method {method!r}; choose from {CALIBRATION_METHODS}")


def _percentile_range(stats: TensorStats, percentile: float) -> Range:
    cdf = np.cumsum(stats.hist) / stats.count
    edges = np.linspace(-stats.half_width, stats.half_width, stats.bins + 1)
    tail = 1.0 - percentile / 100.0
    lo = edges[int(np.searchsorted(cdf, tail, side="left"))]
    hi = edges[int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1]
    return Range(max(stats.min, float(lo)), min(stats.max, float(hi)))


def _entropy_range(stats: TensorStats, bits: int) -> Range:
    """KL-divergence threshold on the folded histogram of ``|x|``."""
    half = stats.bins // 2
    folded = stats.hist[half:] + stats.hist[:half][::-1]
    # The bin at zero holds ReLU's zeros (often most of the mass); zero is always exact, so it
    # must not vote: smeared over a chunk it would make every wide threshold look bad.
    folded[0] = 0
    if not folded.any():
        return Range(stats.min, stats.max)
    levels = 2 ** (bits - 1) if stats.min < 0 else 2**bits
    threshold_bin = _kl_threshold_bin(folded.astype(np.float64), levels)
    threshold = threshold_bin * stats.half_width / half
    return Range(max(stats.min, -threshold), min(stats.max, threshold))


def _kl_threshold_bin(hist: np.ndarray, levels: int) -> int:
    """The bin count ``i`` minimising ``KL(P_i ‖ Q_i)`` (``P_i``: ``hist[:i]`` with the clipped
    tail added to its last bin; ``Q_i``: ``P_i`` merged into ``levels`` chunks, each chunk's mass
    spread evenly over its non-empty bins)."""
    last = int(np.nonzero(hist)[0][-1]) + 1
    if last <= levels:
        return last
    candidates = np.unique(np.linspace(levels, last, num=min(256, last - levels + 1)).astype(int))
    best_bin, best_kl = last, math.inf
    for i in candidates:
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        q = _spread_over_chunks(hist[:i], levels)
        kl = _kl_divergence(p, q)
        if kl < best_kl:
            best_bin, best_kl = int(i), kl
    return best_bin


def _spread_over_chunks(p: np.ndarray, levels: int) -> np.ndarray:
    chunk = np.minimum((np.arange(p.size) * levels) // p.size, levels - 1)
    nonzero = p > 0
    mass = np.bincount(chunk, weights=p, minlength=levels)
    support = np.bincount(chunk, weights=nonzero, minlength=levels)
    per_bin = np.divide(mass, support, out=np.zeros_like(mass), where=support > 0)
    return np.where(nonzero, per_bin[chunk], 0.0)


def _kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-10) -> float:
    p = p / p.sum()
    q = q / max(q.sum(), eps)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], eps))))


def _mse_range(stats: TensorStats, bits: int, steps: int = 100) -> Range:
    """Shrink ``[min, max]`` jointly, then refine each end, minimising the histogram's expected
    squared error under affine ``bits``-bit quantization."""
    qtype = qm.IntType(bits, signed=False)
    centers, weights = stats.bin_centers, stats.hist.astype(np.float64)
    keep = weights > 0
    centers, weights = centers[keep], weights[keep]

    def error(lo: float, hi: float) -> float:
        scale, zero = qm.affine_params(np.float32(lo), np.float32(hi), qtype)
        approx = qm.dequantize(qm.quantize(centers, scale, zero, qtype), scale, zero)
        return float(np.sum(weights * (centers - approx) ** 2))

    factors = np.linspace(1.0 / steps, 1.0, steps)
    best = min(factors, key=lambda f: error(stats.min * f, stats.max * f))
    lo, hi = stats.min * best, stats.max * best
    lo = stats.min * min(factors, key=lambda f: error(stats.min * f, hi)) if stats.min < 0 else lo
    hi = stats.max * min(factors, key=lambda f: error(lo, stats.max * f)) if stats.max > 0 else hi
    return Range(float(lo), float(hi))
