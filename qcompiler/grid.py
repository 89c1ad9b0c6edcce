"""Detect weights that already lie on a block-wise quantization grid; numpy only.

Checkpoints are often dequantized from a pre-quantized file. GGUF ``Q4_1`` (SmolLM2-135M's
source), for one, stores blocks of 32 consecutive input-channel values with an fp16 scale ``d``
and an fp16 minimum ``m``, ``w = d·q + m``, ``q ∈ [0, 15]``, which loaders expand to float32.
Such a weight ``W: [K, N]`` (``y = x W``) is re-expressible *without loss* as ``b``-bit integers.

For each candidate group size ``g`` (blocks of ``g`` consecutive rows, per column) the question
is whether every block's values ``w_i`` sit on an affine grid with at most ``2^b`` levels::

    w_i = s · q_i + o,     q_i ∈ {0, …, 2^b − 1},     o = min_i w_i.

With ``R = max w − min w`` and ``t_i = (w_i − o) / R ∈ [0, 1]`` this holds for the ``n``-step
grid ``s = R / n`` when every ``n·t_i`` is an integer; the block's grid is the coarsest one,
the smallest such ``n``. It is read off the smallest gap between distinct sorted values, ``m``
steps for some integer ``m ≥ 1``: ``n = m·R / gap``. Usually ``m = 1`` (two adjacent levels
occur); otherwise (levels ``{0, 2, 5, 15}``, or 32 values spread over 255 levels) ``m = 2, 3, …``
are tried in turn, and the first that fits is the coarsest grid. "Integer" means
within ``tol`` of a grid step, and the match must then reproduce ``W`` to float32 rounding
(``max_ulps`` ulps of the block's ``max |w|``). Blocks whose values are all equal have no scale:
they get ``q = 0``, ``o`` the value and ``s = |o|`` (1 for zeros), so ``o / s`` is an integer.

The bit width is the smallest of ``bits`` that holds every block's ``n + 1`` levels; group sizes
are tried largest first (fewest parameters) and need ``g | K``. A grid through zero (``o / s``
integer in every block, e.g. GGUF ``Q4_0``'s ``w = d·(q − 8)`` or ``Q8_0``'s ``w = d·q``) has the
integer zero point ``z = −o / s``: ``w = s·(q − z)``, the ``quant_math`` convention.

Random weights are rejected fast: a few blocks are checked first, and the search stops at the
first column chunk with a block that fits no grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Blocks checked before the rest: the first rows of a few columns (a weight that is on no grid
# fails here, cheaply).
_PROBE_BLOCKS, _PROBE_COLUMNS = 16, 8
# Blocks are processed in column chunks of about this many values (bounds temporary memory).
_CHUNK_ELEMENTS = 1 << 21


@dataclasses.dataclass(frozen=True)
class GridMatch:
    """``W ≈ scale·q + offset`` per block of ``group_size`` rows: ``q`` ``uint8 [K, N]`` in
    ``[0, 2^bits − 1]``, ``scale`` and ``offset`` (the block minimum) ``float32 [K/g, N]``;
    ``max_error`` is ``max |W − dequantize()|``."""

    bits: int
    group_size: int
    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    max_error: float

    @property
    def block(self) -> tuple[int, int]:
        """The ``quant_math`` block size, ``(group_size, 1)``."""
        return (self.group_size, 1)

    @property
    def zero_point(self) -> np.ndarray | None:
        """``int32 [K/g, N]`` ``z = −offset/scale`` where that is an integer in every block
        (``W = scale·(q − z)``), else None. A block whose values are all positive has ``z < 0``
        (a constant block ``c > 0``: ``scale = c``, ``z = −1``), so check the range before
        storing ``z`` as an unsigned integer."""
        ratio = -self.offset.astype(np.float64) / self.scale.astype(np.float64)
        z = np.rint(ratio)
        if np.max(np.abs(ratio - z), initial=0.0) > _ZERO_POINT_TOL:
            return None
        return z.astype(np.int32)

    def dequantize(self) -> np.ndarray:
        """``scale·q + offset`` as float32 ``[K, N]``."""
        scale, offset = (np.repeat(p, self.group_size, axis=0) for p in (self.scale, self.offset))
        return scale * self.q.astype(np.float32) + offset


# How close ``offset / scale`` must be to an integer for an integer zero point (float32 rounding
# of offset and scale moves the ratio by about 1e-7 · ratio).
_ZERO_POINT_TOL = 1e-4


def detect_grid(
    w: np.ndarray,
    block_sizes: tuple[int, ...] = (128, 64, 32),
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8),
    *,
    tol: float = 1e-3,
    max_ulps: float = 4.0,
) -> GridMatch | None:
    """The grid ``W: [K, N]`` lies on (largest group size first, then fewest bits), or None.

    ``tol``: how far (in grid steps) a value may sit from its level; ``max_ulps``: the largest
    ``|W − dequantize()|`` accepted, in ulps of each block's ``max |w|``."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"expected a non-empty weight [K, N], got shape {w.shape}")
    if not bits or min(bits) < 1 or max(bits) > 8:
        raise ValueError(f"bit widths must be in [1, 8], got {bits}")
    if not np.all(np.isfinite(w)):
        return None
    for g in sorted(set(block_sizes), reverse=True):
        if g < 1 or w.shape[0] % g:
            continue
        match = _match_group(w, g, sorted(set(bits)), tol, max_ulps)
        if match is not None:
            return match
    return None


def _match_group(w: np.ndarray, g: int, bits: list[int], tol: float, max_ulps: float):
    """The ``GridMatch`` of blocks of ``g`` rows with the fewest of ``bits``, or None."""
    k, n = w.shape
    nb = k // g
    q, steps = np.empty((k, n), np.uint8), np.empty((nb, n), np.int64)
    scale, offset = np.empty((nb, n), np.float32), np.empty((nb, n), np.float32)
    max_steps = (1 << bits[-1]) - 1
    if _fit_blocks(w[: _PROBE_BLOCKS * g, :_PROBE_COLUMNS], g, max_steps, tol) is None:
        return None  # most weights that are on no grid fail on these few blocks
    max_error = 0.0
    chunk = max(1, _CHUNK_ELEMENTS // k)
    for start in range(0, n, chunk):
        cols = slice(start, start + chunk)
        fit = _fit_blocks(w[:, cols], g, max_steps, tol)
        if fit is None:
            return None
        steps[:, cols], q[:, cols], scale[:, cols], offset[:, cols] = fit
        # The float32 arithmetic of GridMatch.dequantize, block by block.
        blocks = w[:, cols].reshape(nb, g, -1)
        restored = scale[:, None, cols] * q[:, cols].reshape(nb, g, -1) + offset[:, None, cols]
        error = np.abs(blocks - restored)
        allowed = max_ulps * np.spacing(np.abs(blocks).max(axis=1))
        if np.any(error.max(axis=1) > allowed):
            return None
        max_error = max(max_error, float(error.max()))
    b = next((b for b in bits if steps.max() <= (1 << b) - 1), None)
    return None if b is None else GridMatch(b, g, q, scale, offset, max_error)


def _fit_blocks(w: np.ndarray, g: int, max_steps: int, tol: float):
    """``steps`` (the ``n`` of each block, 0 if constant; ``[K/g, N]``), ``q`` (``uint8 [K, N]``),
    ``scale`` and ``offset`` (float32 ``[K/g, N]``) of the columns ``w: [K, N]``, or None when some
    block fits no grid of at most ``max_steps`` steps."""
    k, n = w.shape
    blocks = np.ascontiguousarray(w.reshape(k // g, g, n).transpose(0, 2, 1), np.float64).reshape(-1, g)
    ordered = np.sort(blocks, axis=1)
    lo, hi = ordered[:, 0], ordered[:, -1]
    constant = hi == lo
    span = np.where(constant, 1.0, hi - lo)
    # The smallest gap between levels is a multiple of the step (gaps below half the finest
    # allowed step are rounding noise inside one level).
    gaps = np.diff(ordered, axis=1)
    gap = np.where(gaps > (0.5 / max_steps) * span[:, None], gaps, np.inf).min(axis=1)
    if np.any(~constant & np.isinf(gap)):
        return None  # more than 2·max_steps levels
    ratio = np.where(constant, 0.0, span / gap)  # n / m when the smallest gap is m steps
    steps = np.rint(np.minimum(ratio, max_steps + 1)).astype(np.int64)
    t = (blocks - lo[:, None]) / span[:, None]
    scaled = t * steps[:, None]
    q = np.rint(scaled)
    todo = np.nonzero(~constant & (np.abs(scaled - q).max(axis=1) > tol))[0]
    multiple = 1
    while todo.size:  # no two adjacent levels: try a smallest gap of 2, 3, … steps
        multiple += 1
        candidate = np.rint(multiple * ratio[todo])
        if np.any(candidate > max_steps):
            return None  # every smaller multiple failed: this block needs more steps
        scaled = t[todo] * candidate[:, None]
        rounded = np.rint(scaled)
        fits = np.abs(scaled - rounded).max(axis=1) <= tol
        steps[todo[fits]], q[todo[fits]] = candidate[fits], rounded[fits]
        todo = todo[~fits]
    if np.any(steps > max_steps):
        return None
    scale = np.where(constant, np.where(lo == 0, 1.0, np.abs(lo)), span / np.maximum(steps, 1))
    q = q.reshape(k // g, n, g).transpose(0, 2, 1).reshape(k, n).astype(np.uint8)
    return (steps.reshape(k // g, n), q, scale.reshape(k // g, n).astype(np.float32),
            lo.reshape(k // g, n).astype(np.float32))
