"""AWQ math (Lin et al. 2023, "Activation-aware Weight Quantization"), numpy only; no graph code.

A weight-only layer ``Y = X W`` (``X: [tokens, K]``, ``W: [K, N]``) loses most accuracy on the
few input channels whose activations are large (seed 004: "salient weights are determined by
the activations, not the weights"). Like SmoothQuant, AWQ rescales them, but only to protect the
weights; activations stay in float::

    Y = (X diag(s)⁻¹) (diag(s) W)  ≈  (X diag(s)⁻¹) Q(diag(s) W)

A salient row scaled up by ``s_j > 1`` keeps more of its bits; the rows sharing its group pay a
little through the larger group range. Two searches on sampled calibration rows:

1. ``search_scales``: ``s_j = mean_t |x_tj|^α``, normalised by ``sqrt(max s · min s)``, for each
   ``α`` of a grid (``α = 0``: ``s = 1``, plain RTN); keep the ``α`` with the smallest
   relative output error ``‖XW − (X/s) Q(diag(s) W)‖² / ‖XW‖²`` (Q: RTN in the format).
2. ``search_clipping``: per group and output column, shrink the quantization range by a ratio
   ``r`` (symmetric ``±r·max|w|``, affine ``[r·min, r·max]``) and keep the ``r`` minimising that
   block's share of the output error ``‖X_g W_g − X_g Ŵ_g‖²`` (``X_g``: the group's columns of X).

``awq_quantize`` runs both: the caller folds ``1/s`` into the op producing X and stores
``Q(diag(s) W)``. Groups, parameters and rounding are ``quant_math.WeightFormat``'s: ``g``
consecutive rows of W per output column, parameters ``[ceil(K/g), N]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from qcompiler import quant_math as qm

ALPHA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, …, 0.95
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1, …, 0.5
MIN_AWQ_SCALE = 1e-4  # floor of mean|x_j|^α before normalising (AWQ's clamp): dead channels stay finite
_CHUNK = 8  # candidates whose errors are measured together: 8·K·N float64 (57 MB at K=1536, N=576)


# --- errors ----------------------------------------------------------------------------------


def output_error(x_rows: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """Relative output error ``‖X W − X Ŵ‖² / ‖X W‖²`` (``Ŵ``: the weight the layer effectively
    applies to X, ``Q(diag(s) W)`` dequantized and divided by ``s`` row-wise). 0 when ``XW = 0``."""
    x, w = np.asarray(x_rows, np.float32), np.asarray(w, np.float32)
    return float(_output_errors(x, w, [lambda: np.asarray(w_hat, np.float32)])[0])


def _output_errors(x: np.ndarray, w: np.ndarray, w_hats: list[Callable[[], np.ndarray]]) -> np.ndarray:
    """``output_error`` of each candidate (float64 ``[len(w_hats)]``); ``X (W − Ŵ)`` in float32,
    sums in float64."""
    errors = _batched(
        lambda d: np.square(x @ d, dtype=np.float64).sum(axis=0), [lambda f=f: w - f() for f in w_hats]
    ).sum(axis=1)
    return errors / max(np.square(x @ w, dtype=np.float64).sum(), 1e-30)


def group_errors(x_rows: np.ndarray, delta: np.ndarray, group_size: int | None) -> np.ndarray:
    """``E[g, n] = ‖X_g Δ_g[:, n]‖²`` (float64 ``[ceil(K/g), N]``): each block's share of the
    output error of a weight error ``Δ = W − Ŵ``, ``X_g`` being X's columns of group ``g``
    (``group_size=None``: one group, K rows). Cross terms between groups are not counted; this
    is what ``search_clipping`` minimises."""
    x = np.asarray(x_rows, np.float32)
    return _group_error_fn(x, _group_rows(group_size, x.shape[1]))(np.asarray(delta, np.float32))


def _group_rows(group_size: int | None, k: int) -> int:
    return k if group_size is None else min(group_size, k)


def _group_error_fn(x: np.ndarray, g: int) -> Callable[[np.ndarray], np.ndarray]:
    """``delta [K, N] -> group_errors`` for fixed rows ``x`` (work on x done once).

    Either the Gram form ``Δ_gᵀ (X_gᵀ X_g) Δ_g`` in float64 (``G·g²·N`` per call) or the direct
    form ``‖X_g Δ_g‖²`` in float32 (``n·K·N``), whichever is cheaper: Gram when ``2g < n``.
    K is padded with zero rows to a multiple of ``g``; they add nothing to either form.
    """
    n, k = x.shape
    groups = math.ceil(k / g)
    pad = groups * g - k
    xg = np.pad(x, [(0, 0), (0, pad)]).reshape(n, groups, g).transpose(1, 0, 2)  # [G, n, g]

    def blocks(delta: np.ndarray, dtype: type) -> np.ndarray:
        return np.pad(delta, [(0, pad), (0, 0)]).reshape(groups, g, -1).astype(dtype)  # [G, g, N]

    if 2 * g < n:
        xg64 = xg.astype(np.float64)
        gram = xg64.transpose(0, 2, 1) @ xg64  # [G, g, g]

        def gram_form(delta: np.ndarray) -> np.ndarray:
            d = blocks(delta, np.float64)
            return np.einsum("gin,gin->gn", d, gram @ d)

        return gram_form

    def direct_form(delta: np.ndarray) -> np.ndarray:
        return np.square(xg @ blocks(delta, np.float32), dtype=np.float64).sum(axis=1)

    return direct_form


# --- scale search ----------------------------------------------------------------------------


def awq_scales(x_mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max(mean|x_j|^α, 1e-4)``, divided by ``sqrt(max s · min s)`` (float32 ``[K]``).

    The normalisation centres ``s`` on 1 in log scale (AWQ's); ``α = 0`` gives exactly 1."""
    m = np.asarray(x_mean_abs, np.float64)
    s = np.maximum(m**alpha, MIN_AWQ_SCALE)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def scaled_rtn(w: np.ndarray, s: np.ndarray, fmt: qm.WeightFormat) -> np.ndarray:
    """The weight the layer applies to X after scaling: ``diag(s)⁻¹ Q(diag(s) W)`` (RTN)."""
    s = np.asarray(s, np.float32)[:, None]
    return fmt.quantize(np.asarray(w, np.float32) * s).dequantize() / s


@dataclasses.dataclass(frozen=True)
class ScaleChoice:
    """``search_scales``' outcome: ``scales`` ``[K]`` (float32) at the best ``alpha``, its
    relative output error and plain RTN's (``alpha=0``)."""

    alpha: float
    scales: np.ndarray
    error: float
    rtn_error: float

    @property
    def gain(self) -> float:
        """How many times smaller the error is than RTN's."""
        return self.rtn_error / max(self.error, 1e-30)


def search_scales(
    x_rows: np.ndarray,
    w: np.ndarray,
    fmt: qm.WeightFormat,
    grid: tuple[float, ...] = ALPHA_GRID,
    x_mean_abs: np.ndarray | None = None,
) -> ScaleChoice:
    """The ``α`` of ``grid`` minimising ``‖XW − (X/s) Q(diag(s) W)‖² / ‖XW‖²`` on ``x_rows``.

    ``s = awq_scales(mean|x|, α)``; ``x_mean_abs`` (``[K]``): ``mean|x_j|`` over all calibration
    rows, when they are more than ``x_rows`` (default: ``x_rows``' own). Ties go to the smaller
    ``α``; a one-element grid fixes ``α`` whatever its error.
    """
    x, w = _check_operands(x_rows, w)
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"alpha grid must be a non-empty set of values in [0, 1], got {grid}")
    if x_mean_abs is None:
        x_mean_abs = np.abs(x).mean(axis=0, dtype=np.float64)
    x_mean_abs = np.asarray(x_mean_abs, np.float64)
    valid = np.all(np.isfinite(x_mean_abs)) and np.all(x_mean_abs >= 0)
    if x_mean_abs.shape != (x.shape[1],) or not valid:
        raise ValueError(f"x_mean_abs must be finite, non-negative, shape ({x.shape[1]},)")

    alphas = sorted(set(float(a) for a in grid))  # ascending: argmin's first minimum is the smaller α
    scales = [awq_scales(x_mean_abs, a) for a in alphas]
    errors = _output_errors(x, w, [lambda s=s: scaled_rtn(w, s, fmt) for s in scales])  # [A]
    rtn = float(errors[0]) if alphas[0] == 0.0 else output_error(x, w, fmt.quantize(w).dequantize())
    i = int(np.argmin(errors))
    return ScaleChoice(alphas[i], scales[i], float(errors[i]), rtn)


# --- clipping search -------------------------------------------------------------------------


def block_range(w: np.ndarray, fmt: qm.WeightFormat) -> tuple[np.ndarray, np.ndarray]:
    """Per-block minimum and maximum of ``W`` (float32 ``[ceil(K/g), N]`` each)."""
    w = np.asarray(w, np.float32)
    block = fmt.block(w.shape)
    return qm.block_reduce(w, block, np.minimum), qm.block_reduce(w, block, np.maximum)


def quantize_with_range(
    w: np.ndarray, fmt: qm.WeightFormat, lo: np.ndarray, hi: np.ndarray
) -> qm.QuantizedTensor:
    """``W`` quantized in ``fmt`` with each block's range given (``lo``, ``hi``:
    ``[ceil(K/g), N]``) instead of taken from the block (``quant_math.range_params``). Values outside the range clip to
    ``q_min``/``q_max``. With the blocks' own min/max this is ``fmt.quantize(w)`` exactly."""
    w = np.asarray(w, np.float32)
    block = fmt.block(w.shape)
    shape = qm.param_shape(w.shape, block)
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if lo.shape != shape or hi.shape != shape:
        raise ValueError(f"lo/hi must have the parameter shape {shape}, got {lo.shape}, {hi.shape}")
    scale, zero_point = qm.range_params(lo, hi, fmt.qtype, fmt.symmetric)
    return qm.QuantizedTensor(qm.quantize(w, scale, zero_point, fmt.qtype, block), scale, zero_point, block)


@dataclasses.dataclass(frozen=True)
class ClippedTensor(qm.QuantizedTensor):
    """A ``QuantizedTensor`` whose block ranges were shrunk: ``ratio`` ``[ceil(K/g), N]``
    (float32) is the factor each block's range was scaled by (1.0: RTN's range)."""

    ratio: np.ndarray


def search_clipping(
    x_rows: np.ndarray,
    w: np.ndarray,
    fmt: qm.WeightFormat,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> ClippedTensor:
    """``W`` quantized with, per block (group × output column), the range ratio of ``ratios``
    minimising ``‖X_g W_g − X_g Ŵ_g‖²`` on ``x_rows`` (``group_errors``).

    The range at ratio ``r`` is ``±r·max|w|`` (symmetric) or ``[r·min, r·max]`` (affine) of the
    block; ``r = 1`` is RTN exactly, so with 1.0 in ``ratios`` no block's error exceeds RTN's on
    these rows. Ties go to the earlier ratio (1.0 first by default). ``ratios=(1.0,)``: RTN.
    """
    x, w = _check_operands(x_rows, w)
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"clipping ratios must be a non-empty set of values in (0, 1], got {ratios}")
    lo, hi = block_range(w, fmt)
    errors_of = _group_error_fn(x, _group_rows(fmt.group_size, w.shape[0]))
    candidates = np.asarray(ratios, np.float32)
    deltas = [lambda r=r: w - quantize_with_range(w, fmt, r * lo, r * hi).dequantize()
              for r in candidates]
    errors = _batched(errors_of, deltas)  # [R, G, N]
    ratio = candidates[np.argmin(errors, axis=0)]  # argmin: the first of equal minima
    qt = quantize_with_range(w, fmt, ratio * lo, ratio * hi)
    return ClippedTensor(qt.q, qt.scale, qt.zero_point, qt.block, ratio)


# --- both ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AWQResult:
    """``awq_quantize``'s outcome. The caller divides X by ``scales`` (folded into the op that
    produces X) and stores ``quantized`` = ``Q(diag(scales) W)``; the layer then computes
    ``(X / scales) · quantized.dequantize()``. Errors: relative output errors on the search
    rows of RTN, of scaling alone and of scaling with clipping."""

    alpha: float
    scales: np.ndarray  # [K] float32
    quantized: ClippedTensor  # of diag(scales) W
    rtn_error: float
    scaled_error: float
    clipped_error: float

    @property
    def gain(self) -> float:
        """How many times smaller the final error is than RTN's."""
        return self.rtn_error / max(self.clipped_error, 1e-30)

    def effective_weight(self) -> np.ndarray:
        """``diag(s)⁻¹ Q(diag(s) W)``: what the layer applies to the unscaled X."""
        return self.quantized.dequantize() / self.scales[:, None]


def awq_quantize(
    x_rows: np.ndarray,
    w: np.ndarray,
    fmt: qm.WeightFormat,
    grid: tuple[float, ...] = ALPHA_GRID,
    ratios: tuple[float, ...] = CLIP_RATIOS,
    x_mean_abs: np.ndarray | None = None,
) -> AWQResult:
    """AWQ of ``W: [K, N]`` on calibration rows ``x_rows: [n, K]``: ``search_scales`` picks ``s``,
    then ``search_clipping`` quantizes ``diag(s) W`` against the rows ``X/s`` (the same output
    ``XW``). ``grid=(0.0,)``: no scaling; ``ratios=(1.0,)``: no clipping; both: RTN exactly."""
    x, w = _check_operands(x_rows, w)
    choice = search_scales(x, w, fmt, grid, x_mean_abs)
    s = choice.scales
    quantized = search_clipping(x / s, w * s[:, None], fmt, ratios)
    clipped_error = output_error(x, w, quantized.dequantize() / s[:, None])
    return AWQResult(choice.alpha, s, quantized, choice.rtn_error, choice.error, clipped_error)


def _batched(
    measure: Callable[[np.ndarray], np.ndarray], deltas: list[Callable[[], np.ndarray]]
) -> np.ndarray:
    """``stack([measure(delta()) for delta in deltas])``, with the ``[K, N]`` deltas of a chunk
    side by side along N so that ``measure`` runs as one large matrix product per chunk (many
    small ones are slow with threaded BLAS on busy cores). ``measure`` acts column-wise:
    ``[K, M] -> [..., M]``."""
    out = []
    for start in range(0, len(deltas), _CHUNK):
        chunk = [delta() for delta in deltas[start : start + _CHUNK]]
        n = chunk[0].shape[1]
        m = measure(np.concatenate(chunk, axis=1))
        out.extend(m[..., i * n : (i + 1) * n] for i in range(len(chunk)))
    return np.stack(out)


def _check_operands(x_rows: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.asarray(x_rows, np.float32), np.asarray(w, np.float32)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need x_rows [n>0, K] and w [K, N], got {x.shape} and {w.shape}")
    return x, w
