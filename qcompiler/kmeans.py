"""K-means (codebook) weight quantization (seed 004, "K-Means-based Weight Quantization"); numpy
only, no graph code.

A weight ``W: [K, N]`` (``y = x W``) is replaced by ``b``-bit indices into a table of ``2^b``
float centroids, one table per output column (per-channel) or one for the whole tensor::

    Ŵ[k, n] = c[n, idx[k, n]]        (per-tensor: c[0, idx[k, n]])

The centroids of each codebook minimise the squared error over its values ``w``

    E = Σ (w − c_idx(w))²,           idx(w) = argmin_j |w − c_j|,

found by Lloyd's algorithm: assign every value to its nearest centroid, move every centroid to
the mean of its values, repeat. Neither step increases ``E``. In one dimension the clusters of
sorted centroids are intervals of the sorted values split at the midpoints
``(c_j + c_{j+1}) / 2``, so each codebook's values are sorted once and an iteration is a search for
``2^b − 1`` midpoints plus prefix-sum differences; all codebooks advance together.

Deterministic: the centroids start on the uniform grid ``min + (max − min)·j / (2^b − 1)`` of each
codebook (so the start is the min-max linear quantizer, and k-means is never worse than it),
empty clusters keep their previous centroid, and a codebook stops when its assignment no longer
changes. A codebook holding at most ``2^b`` distinct values gets exactly those values (E = 0),
which Lloyd iterations from the grid do not always reach.

Storage is ``b``-bit indices (kept in ``uint8``) plus ``2^b`` float32 centroids per codebook:
the gain over a linear grid is the freedom to place levels where the weights are dense.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Codebooks are processed in chunks of about this many weights (bounds temporary memory).
_CHUNK_ELEMENTS = 1 << 21


@dataclasses.dataclass(frozen=True)
class Codebook:
    """``indices`` (``uint8 [K, N]``, each ``< 2^bits``) into ``centroids`` (``float32
    [N, 2^bits]`` per-channel: row ``n`` is the codebook of output column ``n``; ``[1, 2^bits]``
    per-tensor)."""

    indices: np.ndarray
    centroids: np.ndarray

    def __post_init__(self) -> None:
        indices, centroids = self.indices, self.centroids
        if indices.ndim != 2 or indices.dtype != np.uint8:
            raise ValueError(f"indices must be uint8 [K, N], got {indices.dtype} {indices.shape}")
        if centroids.ndim != 2 or centroids.dtype != np.float32:
            raise ValueError(f"centroids must be float32 [C, 2^b], got {centroids.dtype} "
                             f"{centroids.shape}")
        if self.centroids.shape[0] not in (1, self.indices.shape[1]):
            raise ValueError(f"{self.centroids.shape[0]} codebooks for {self.indices.shape[1]} columns")
        levels = self.centroids.shape[1]
        if levels & (levels - 1) or not 2 <= levels <= 256:
            raise ValueError(f"a codebook holds 2^b (b in [1, 8]) centroids, got {levels}")

    @property
    def bits(self) -> int:
        return self.centroids.shape[1].bit_length() - 1

    @property
    def per_channel(self) -> bool:
        """One codebook per column (a single-column weight counts as per-tensor)."""
        return self.centroids.shape[0] == self.indices.shape[1] and self.indices.shape[1] > 1

    def decode(self) -> np.ndarray:
        """``Ŵ = centroids[col, indices]`` as float32 ``[K, N]``."""
        if self.centroids.shape[0] == 1:
            return self.centroids[0][self.indices]
        return self.centroids[np.arange(self.indices.shape[1]), self.indices]


def kmeans_quantize(w: np.ndarray, bits: int, per_channel: bool, iterations: int = 25) -> Codebook:
    """Cluster ``W: [K, N]`` into ``2^bits`` centroids per output column (``per_channel``) or for
    the whole tensor, with at most ``iterations`` Lloyd iterations (0: the uniform min-max grid)."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"expected a non-empty weight [K, N], got shape {w.shape}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite")
    rows = np.ascontiguousarray(w.T) if per_channel else w.reshape(1, -1)  # one codebook per row
    rows = rows + np.float32(0.0)  # -0.0 -> +0.0, so that the order keys below agree with floats
    levels = 1 << bits
    chunk = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    indices = np.empty(rows.shape, np.uint8)
    centroids = np.empty((rows.shape[0], levels), np.float32)
    for start in range(0, rows.shape[0], chunk):
        part = slice(start, start + chunk)
        centroids[part], indices[part] = _cluster_rows(rows[part], levels, iterations)
    return Codebook(indices.T if per_channel else indices.reshape(w.shape), centroids)


# --- one chunk of codebooks (rows) -----------------------------------------------------------


def _order_keys(x: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Flat ``uint64`` keys ``row_id << 32 | f(x)`` of float32 ``x: [R, M]``, ``f`` the
    order-preserving map of float32 bits: keys compare exactly like ``(row_id, value)``, so one
    ``searchsorted`` serves all rows."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    flip = np.where(bits >> np.uint32(31), np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    row = np.asarray(row_ids, np.uint64)[:, None] << np.uint64(32)
    return (row | (bits ^ flip).astype(np.uint64)).ravel()


def _boundary_keys(centroids: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Keys of the midpoints between sorted centroids, rounded *down* to float32: for a float32
    ``x``, ``x ≤ b`` exactly when ``x ≤ floor32(b)``, so cluster ``j`` is ``(b_{j−1}, b_j]``."""
    mid = 0.5 * (centroids[:, :-1] + centroids[:, 1:])
    mid32 = mid.astype(np.float32)
    above = mid32.astype(np.float64) > mid
    mid32[above] = np.nextafter(mid32[above], np.float32(-np.inf))
    return _order_keys(mid32 + np.float32(0.0), row_ids)


def _cluster_rows(rows: np.ndarray, levels: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm on every row of ``rows: [C, L]`` at once; returns float32 centroids
    ``[C, levels]`` and uint8 indices ``[C, L]`` (nearest final centroid)."""
    count, length = rows.shape
    ordered = np.sort(rows, axis=1)
    lo, hi = ordered[:, :1].astype(np.float64), ordered[:, -1:].astype(np.float64)
    centroids = lo + (hi - lo) * (np.arange(levels) / (levels - 1))  # the uniform min-max grid

    # At most `levels` distinct values: the codebook is those values, exactly.
    few = np.count_nonzero(ordered[:, 1:] != ordered[:, :-1], axis=1) < levels
    if np.any(few):
        values = ordered[few]
        rank = np.cumsum(values[:, 1:] != values[:, :-1], axis=1)  # of ordered[:, 1:] among distinct
        exact = np.repeat(values[:, -1:].astype(np.float64), levels, axis=1)
        exact[:, 0] = values[:, 0]
        exact[np.repeat(np.arange(values.shape[0]), length - 1), rank.ravel()] = values[:, 1:].ravel()
        centroids[few] = exact

    all_rows = np.arange(count)
    keys = _order_keys(ordered, all_rows)
    prefix = np.zeros((count, length + 1), np.float64)
    np.cumsum(ordered, axis=1, dtype=np.float64, out=prefix[:, 1:])
    active = np.nonzero(~few)[0]
    previous = None
    for _ in range(iterations):
        if active.size == 0:
            break
        # Assignment: cluster j of row r is ordered[r, ends[r, j] : ends[r, j + 1]].
        found = np.searchsorted(keys, _boundary_keys(centroids[active], active), side="right")
        ends = np.empty((active.size, levels + 1), np.int64)
        ends[:, 0], ends[:, -1] = 0, length
        ends[:, 1:-1] = found.reshape(active.size, levels - 1) - (active * length)[:, None]
        if previous is not None:
            moved = np.any(ends != previous, axis=1)
            active, ends = active[moved], ends[moved]
            if active.size == 0:
                break
        # Update: the mean of every non-empty cluster; empty clusters keep their centroid.
        sums = np.diff(prefix.ravel()[(active * (length + 1))[:, None] + ends], axis=1)
        sizes = np.diff(ends, axis=1)
        old = centroids[active]
        new = np.where(sizes > 0, sums / np.maximum(sizes, 1), old)
        centroids[active] = np.maximum.accumulate(new, axis=1)  # keeps rounding from unsorting them
        previous = ends

    final = centroids.astype(np.float32)
    final = np.maximum.accumulate(final, axis=1)
    bounds = _boundary_keys(final.astype(np.float64), all_rows)
    found = np.searchsorted(bounds, _order_keys(rows, all_rows), side="left").reshape(count, length)
    indices = found - (np.arange(count) * (levels - 1))[:, None]
    return final, indices.astype(np.uint8)
