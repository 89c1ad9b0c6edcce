"""SmoothQuant math (numpy only; the graph rewrite is ``passes.smoothquant``).

A linear layer ``Y = X W`` (``X: [tokens, K]``, ``W: [K, N]``) is unchanged by a positive
per-input-channel scale ``s`` (seed 002, SmoothQuant)::

    Y = (X diag(s)⁻¹) (diag(s) W)

so activation outliers (a few channels ~100× the rest) can be moved into the weights, which
quantize per output channel and tolerate them. The migration strength ``α`` picks

    s_j = max|X_j|^α / max|W_j|^(1−α)        (max|W_j|: row j of W, over every layer of a group)

``α = 0`` leaves the activations' ranges alone (``s_j = 1/max|W_j|``), ``α = 1`` flattens them.
Layers that read one tensor (q/k/v; gate/up) share ``s``: their weights are stacked along N.

``α`` is chosen per group by ``search_alpha``: the relative output error of the quantized
layer, ``‖XW − Q(X/s) Q(sW)‖² / ‖XW‖²`` over the calibration rows (estimated from the rows of
largest magnitude and a weighted uniform sample of the rest), for each ``α`` of a grid
and for no smoothing at all (``None``); weights are quantized as the compiler does (int8,
symmetric, per output channel) and activations by the scheme that will run. A static range is
fitted to calibration data and meets spikes it never saw on new data; given the samples in
folds, the search fits ``s`` and the range on one fold and measures the error on another
(cross-validation), which charges an ``α`` for the spikes its range would clip.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from qcompiler import quant_math as qm

ALPHA_GRID: tuple[float, ...] = tuple(round(a, 2) for a in np.arange(0.05, 0.96, 0.05))
MIN_SMOOTHING = 1e-5  # floor of max|X_j| and max|W_j|: a dead channel keeps a finite scale


def smoothing_scales(
    x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float, tied: np.ndarray | None = None
) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` (float32, positive, finite).

    ``tied[j]``: the source channel that X's channel ``j`` is a copy of (the value head a
    query head reads); channels with one source share one ``s``, computed from the max over
    them of ``max|X_j|`` and ``max|W_j|``.
    """
    x = np.maximum(np.asarray(x_absmax, np.float64), MIN_SMOOTHING)
    w = np.maximum(np.asarray(w_absmax, np.float64), MIN_SMOOTHING)
    if tied is not None:
        x, w = tied_max(x, tied)[tied], tied_max(w, tied)[tied]
    return (x**alpha / w ** (1.0 - alpha)).astype(np.float32)


def tied_max(values: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """``out[c] = max_{j: tied[j] = c} values[j]`` (0 for a source no channel copies)."""
    out = np.zeros(int(tied.max()) + 1, np.float64)
    np.maximum.at(out, tied, values)
    return out


STATIC_SCHEMES = ("static", "dynamic")  # one range per tensor: the smoothed channels' range


def fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """``W`` ``[K, N]`` through int8 symmetric per-output-channel quantization (the compiler's
    weight policy, ``quant_math.quantize_tensor(w, PerAxis(1))``, written for speed: it runs
    once per α and group)."""
    scale = qm.symmetric_scale(np.abs(w).max(axis=0, keepdims=True), qm.INT8)
    return np.clip(np.rint(w / scale), -qm.INT8.qmax, qm.INT8.qmax) * scale


def fake_quant_activation(
    x: np.ndarray, scheme: str, lo: float | None = None, hi: float | None = None
) -> np.ndarray:
    """``X`` ``[rows, K]`` quantized and dequantized as ``scheme`` runs it.

    ``static`` / ``dynamic``: uint8 affine over ``[lo, hi]`` (the tensor's range; the rows'
    own range when not given). ``per-token``: uint8 affine per row. ``per-token-sym``: int8
    symmetric per row.
    """
    if scheme in ("static", "dynamic"):
        lo = float(x.min()) if lo is None else lo
        hi = float(x.max()) if hi is None else hi
        scale, zero = qm.affine_params(np.float32(lo), np.float32(hi), qm.UINT8)
        return qm.dequantize(qm.quantize(x, scale, zero, qm.UINT8), scale, zero)
    if scheme == "per-token":
        return qm.quantize_tensor(x, qm.PerAxis(0), qm.UINT8, symmetric=False).dequantize()
    if scheme == "per-token-sym":
        return qm.quantize_tensor(x, qm.PerAxis(0), qm.INT8, symmetric=True).dequantize()
    raise ValueError(f"unknown activation scheme {scheme!r}")


@dataclasses.dataclass(frozen=True)
class ChannelRange:
    """Per-input-channel minimum and maximum of an activation over all calibration tokens."""

    lo: np.ndarray
    hi: np.ndarray

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.lo), np.abs(self.hi))

    def smoothed(self, s: np.ndarray) -> tuple[float, float]:
        """The tensor range of ``X/s`` (``s > 0`` keeps each channel's order)."""
        return float((self.lo / s).min()), float((self.hi / s).max())


def error_terms(
    x_rows: np.ndarray,
    w: np.ndarray,
    s: np.ndarray | None,
    scheme: str,
    channels: ChannelRange,
    reference: np.ndarray | None = None,
    row_weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """``(Σ ‖XW − Q(X/s) Q(sW)‖², Σ ‖XW‖²)`` over ``x_rows``, whose ratio is the layer's
    relative quantized output error (``s=None``: no smoothing; ``channels``: the range a static
    scheme quantizes ``X/s`` over; ``reference``: ``XW`` when already computed;
    ``row_weights``: each row's weight in both sums, ``RowSample.weighted``)."""
    s = np.ones(w.shape[0], np.float32) if s is None else s
    lo, hi = channels.smoothed(s) if scheme in STATIC_SCHEMES else (None, None)
    x_q = fake_quant_activation(x_rows / s, scheme, lo, hi)
    w_q = fake_quant_weight(w * s[:, None])
    reference = x_rows @ w if reference is None else reference
    weights = np.ones(len(x_rows)) if row_weights is None else np.asarray(row_weights, np.float64)
    error = weights @ np.square(reference - x_q @ w_q, dtype=np.float64).sum(axis=1)
    return float(error), float(weights @ np.square(reference, dtype=np.float64).sum(axis=1))


@dataclasses.dataclass(frozen=True)
class Observed:
    """What calibration saw of one activation (all of it, or one fold of the samples): sampled
    rows ``[rows, K]`` with their weights (``RowSample.weighted``; None: 1 each) and the
    per-channel range over every row."""

    rows: np.ndarray
    channels: ChannelRange
    row_weights: np.ndarray | None = None


def merged_range(observed: Sequence[Observed]) -> ChannelRange:
    """The per-channel range over every fold."""
    return ChannelRange(np.min([o.channels.lo for o in observed], axis=0),
                        np.max([o.channels.hi for o in observed], axis=0))


@dataclasses.dataclass(frozen=True)
class AlphaChoice:
    """The outcome of the search: ``alpha=None`` means "do not smooth"."""

    alpha: float | None
    error: float  # relative output error at ``alpha``
    unsmoothed_error: float
    scales: np.ndarray | None

    @property
    def gain(self) -> float:
        """How many times smaller the error is than without smoothing (1.0 when not smoothed)."""
        return self.unsmoothed_error / max(self.error, 1e-30)


def search_alpha(
    observed: Observed | Sequence[Observed],
    w: np.ndarray,
    scheme: str,
    grid: tuple[float, ...] = ALPHA_GRID,
    tied: np.ndarray | None = None,
) -> AlphaChoice:
    """The ``α`` of ``grid`` (or none) with the smallest quantized output error.

    ``observed``: the activation as calibration saw it, whole or in folds; ``w``: the group's
    weights stacked ``[K, N]``. With folds the error is cross-validated: for each pair of
    folds ``(f, g)``, ``f ≠ g``, ``s`` and the static range come from ``f``'s channel ranges
    and the error is measured on ``g``'s rows, so that an ``α`` whose range a spike unseen in
    ``f`` would overflow pays for it (held-out data brings such spikes); the relative error is
    ``Σ error / Σ ‖XW‖²`` over the pairs. The scales returned are computed from every fold's
    range. A one-element grid fixes ``α`` (``--smoothquant-alpha``): it is applied whatever
    the error. ``tied``: see ``smoothing_scales``.
    """
    folds = [observed] if isinstance(observed, Observed) else list(observed)
    pairs = [(f, g) for f in folds for g in folds if f is not g] or [(folds[0], folds[0])]
    w = np.asarray(w, np.float32)
    w_absmax = np.abs(w).max(axis=1)
    references = {id(g): np.asarray(g.rows, np.float32) @ w for g in folds}

    def error(alpha: float | None) -> float:
        total = energy = 0.0
        for fit, held in pairs:
            s = None if alpha is None else smoothing_scales(fit.channels.absmax, w_absmax, alpha, tied)
            e, r = error_terms(np.asarray(held.rows, np.float32), w, s, scheme, fit.channels,
                                references[id(held)], held.row_weights)
            total, energy = total + e, energy + r
        return total / max(energy, 1e-30)

    unsmoothed = error(None)
    best = AlphaChoice(None, unsmoothed, unsmoothed, None) if len(grid) > 1 else None
    for alpha in grid:
        e = error(alpha)
        if best is None or e < best.error:
            best = AlphaChoice(alpha, e, unsmoothed, None)
    if best.alpha is not None:
        scales = smoothing_scales(merged_range(folds).absmax, w_absmax, best.alpha, tied)
        best = dataclasses.replace(best, scales=scales)
    return best


def outlier_ratio(x_absmax: np.ndarray) -> float:
    """``max_j max|X_j| / median_j max|X_j|``: ~100 in LLM hidden states (seed 002), ≲ 5 when
    activations are even."""
    a = np.asarray(x_absmax, np.float64)
    return float(a.max() / max(np.median(a), 1e-12)) if a.size else 0.0
