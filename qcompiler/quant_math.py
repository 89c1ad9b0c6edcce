"""Affine quantization math, numpy only (no graph plumbing here).

A real value ``r`` is approximated by an integer ``q`` (seed 004, "Linear Quantization")::

    q = clip(round(r / s) + z, q_min, q_max)        r ≈ s · (q − z)

* symmetric: ``z = 0`` and ``s = max|r| / q_max``;
* affine (asymmetric): ``s = (r_max − r_min) / (q_max − q_min)`` and
  ``z = q_min − round(r_min / s)``, with ``r_min ≤ 0 ≤ r_max`` enforced so that 0.0 is exact.

Rounding is half-to-even, as ONNX ``QuantizeLinear`` does, so these functions are a bit-exact
reference for the graphs qcompile emits.

Granularity has one notion, a *block size* per dimension (torchao's ``block_size``): every
element of a block shares one scale and zero point. Per-tensor is ``block = shape``, per-axis
``a`` is ``block[a] = 1`` and ``block[d] = shape[d]`` elsewhere, group-wise along axis ``a`` with
group ``g`` is ``block[a] = g`` and 1 on the channel axis. Parameters have shape
``ceil(shape / block)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# The smallest scale we ever emit: a constant-zero tensor still gets a valid (positive) scale.
MIN_SCALE = np.float32(1e-12)


@dataclasses.dataclass(frozen=True)
class IntType:
    """An integer storage type: ``bits`` wide, signed or not."""

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def numpy_dtype(self) -> type:
        return np.int8 if self.signed else np.uint8


INT8 = IntType(8, signed=True)
UINT8 = IntType(8, signed=False)


# --- granularity -> block size -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def block_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(d) for d in shape)


@dataclasses.dataclass(frozen=True)
class PerAxis:
    """One scale per index of ``axis`` (per output channel for weights)."""

    axis: int

    def block_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        axis = _normalize_axis(self.axis, len(shape))
        return tuple(1 if d == axis else int(n) for d, n in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """Groups of ``size`` consecutive elements along ``axis``, one scale per group and per index
    of every other dimension (for a weight ``[K, N]``: ``PerGroup(size=128, axis=0)``)."""

    size: int
    axis: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"group size must be positive, got {self.size}")

    def block_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        axis = _normalize_axis(self.axis, len(shape))
        return tuple(min(self.size, int(n)) if d == axis else 1 for d, n in enumerate(shape))


Granularity = PerTensor | PerAxis | PerGroup


def _normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def param_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """Shape of the scale/zero-point tensor: ``ceil(shape / block)`` per dimension."""
    return tuple(math.ceil(n / b) for n, b in zip(shape, block))


def block_reduce(x: np.ndarray, block: Sequence[int], reduce: np.ufunc) -> np.ndarray:
    """Reduce every block of ``x`` with ``reduce`` (``np.maximum``, ``np.minimum``).

    Ragged edge blocks (a dimension not divisible by its block) are padded with their own edge
    value, which changes no max or min.
    """
    if len(block) != x.ndim:
        raise ValueError(f"block {tuple(block)} does not match rank {x.ndim}")
    pshape = param_shape(x.shape, block)
    pad = [(0, p * b - n) for n, b, p in zip(x.shape, block, pshape)]
    if any(after for _, after in pad):
        x = np.pad(x, pad, mode="edge")
    split = [s for p, b in zip(pshape, block) for s in (p, b)]
    return reduce.reduce(x.reshape(split), axis=tuple(range(1, 2 * x.ndim, 2)))


def expand_params(p: np.ndarray, block: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Repeat per-block parameters back to the full tensor ``shape``."""
    for axis, b in enumerate(block):
        if b > 1:
            p = np.repeat(p, b, axis=axis)
    return p[tuple(slice(0, n) for n in shape)]


# --- parameters ------------------------------------------------------------------------------


def symmetric_scale(amax: np.ndarray, qtype: IntType = INT8) -> np.ndarray:
    """``s = max|r| / q_max`` (zero point 0); all-zero blocks get ``MIN_SCALE``."""
    scale = np.asarray(amax, np.float32) / np.float32(qtype.qmax)
    return np.maximum(scale, MIN_SCALE).astype(np.float32)


def affine_params(
    rmin: np.ndarray, rmax: np.ndarray, qtype: IntType = UINT8
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping ``[rmin, rmax]`` (widened to contain 0) onto the full
    integer range: ``s = (r_max − r_min)/(q_max − q_min)``, ``z = q_min − round(r_min / s)``."""
    rmin = np.minimum(np.asarray(rmin, np.float32), 0.0)
    rmax = np.maximum(np.asarray(rmax, np.float32), 0.0)
    scale = np.maximum((rmax - rmin) / np.float32(qtype.qmax - qtype.qmin), MIN_SCALE)
    zero_point = np.clip(qtype.qmin - np.rint(rmin / scale), qtype.qmin, qtype.qmax)
    return scale.astype(np.float32), zero_point.astype(qtype.numpy_dtype)


def range_params(
    lo: np.ndarray, hi: np.ndarray, qtype: IntType, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of ranges ``[lo, hi]``: symmetric ``s = max(|lo|, |hi|)/q_max``,
    ``z = 0``; else ``affine_params``. The one rule every weight method uses (RTN, GPTQ's
    groups, AWQ's clipped ranges)."""
    if symmetric:
        scale = symmetric_scale(np.maximum(np.abs(lo), np.abs(hi)), qtype)
        return scale, np.zeros_like(scale, dtype=qtype.numpy_dtype)
    return affine_params(lo, hi, qtype)


# --- quantize / dequantize -------------------------------------------------------------------


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | int,
    qtype: IntType,
    block: Sequence[int] | None = None,
) -> np.ndarray:
    """``q = clip(round_half_even(x / s) + z, q_min, q_max)``; ``block=None`` means the
    parameters already broadcast against ``x``."""
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    if block is not None:
        scale = expand_params(scale, block, x.shape)
        zero_point = expand_params(zero_point, block, x.shape) if zero_point.ndim else zero_point
    q = np.rint(x.astype(np.float32) / scale) + zero_point.astype(np.float32)
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.numpy_dtype)


def dequantize(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | int,
    block: Sequence[int] | None = None,
) -> np.ndarray:
    """``r = s · (q − z)`` in float32."""
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    if block is not None:
        scale = expand_params(scale, block, q.shape)
        zero_point = expand_params(zero_point, block, q.shape) if zero_point.ndim else zero_point
    return (scale * (q.astype(np.float32) - zero_point.astype(np.float32))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Integer values with their per-block parameters."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    block: tuple[int, ...]

    def dequantize(self) -> np.ndarray:
        return dequantize(self.q, self.scale, self.zero_point, self.block)


def quantize_tensor(
    x: np.ndarray, granularity: Granularity, qtype: IntType = INT8, symmetric: bool = True
) -> QuantizedTensor:
    """Round-to-nearest quantization of a (weight) tensor at the given granularity."""
    block = granularity.block_size(x.shape)
    lo, hi = block_reduce(x, block, np.minimum), block_reduce(x, block, np.maximum)
    scale, zero_point = range_params(lo, hi, qtype, symmetric)
    return QuantizedTensor(quantize(x, scale, zero_point, qtype, block), scale, zero_point, block)


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a weight-only layer stores its weight ``W: [K, N]`` (``y = x W``): ``bits``-bit
    integers in groups of ``group_size`` consecutive input channels (rows of ``W``) per output
    channel, or one group per output channel (``group_size=None``: per-channel). ``symmetric``:
    signed integers, ``z = 0``, ``s = max|w|/q_max``; otherwise unsigned with an integer zero
    point (``affine_params``). In block-size terms: ``block = (group_size or K, 1)``."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        IntType(self.bits, self.symmetric)  # validates bits
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group size must be positive, got {self.group_size}")

    @property
    def qtype(self) -> IntType:
        return IntType(self.bits, signed=self.symmetric)

    def granularity(self) -> PerGroup | PerAxis:
        return PerAxis(1) if self.group_size is None else PerGroup(self.group_size, axis=0)

    def block(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self.granularity().block_size(shape)

    def quantize(self, w: np.ndarray) -> QuantizedTensor:
        """Round-to-nearest (RTN) of ``W: [K, N]``."""
        return quantize_tensor(np.asarray(w, np.float32), self.granularity(), self.qtype, self.symmetric)


# --- integer linear ops (seed 004: "Linear Operations Can Cheaply Deal with Scales") -------
#
# With symmetric weights (z_w = 0) a linear layer y = W x + b on quantized operands is
#
#     y ≈ s_x s_w · (Σ_k (x^q_k − z_x) W^q_k + b^q)            b^q = round(b / (s_x s_w))
#       = s_x s_w · (Σ_k x^q_k W^q_k + B^q)                     B^q = b^q − z_x Σ_k W^q_k
#
# B^q is one int32 per output channel, computed offline; the run-time work is the integer
# product and one multiply. Requantizing to an 8-bit output is q_y = round(M · acc) + z_y with
# M = s_x s_w / s_y.

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def bias_to_int32(bias: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """``b^q = round_half_even(b / (s_x s_w))`` (int32), the bias on the accumulator's grid."""
    grid = np.float64(x_scale) * np.asarray(w_scale, np.float64)
    q = np.rint(np.asarray(bias, np.float64) / grid)
    if np.any(q < INT32_MIN) or np.any(q > INT32_MAX):
        raise OverflowError("bias does not fit int32 on the s_x·s_w grid")
    return q.astype(np.int32)


def fold_zero_point(
    bias_q: np.ndarray, x_zero: int, w_q: np.ndarray, reduce_axes: tuple[int, ...]
) -> np.ndarray:
    """``B^q = b^q − z_x · Σ W^q`` over the input axes ``reduce_axes`` (int32, exact)."""
    column_sums = w_q.astype(np.int64).sum(axis=reduce_axes)
    folded = np.asarray(bias_q, np.int64) - np.int64(x_zero) * column_sums
    if np.any(folded < INT32_MIN) or np.any(folded > INT32_MAX):
        raise OverflowError("folded bias does not fit int32")
    return folded.astype(np.int32)


def integer_matmul(x_q: np.ndarray, x_zero: int, w_q: np.ndarray, bias_q=None) -> np.ndarray:
    """The exact int64 accumulator ``Σ_k (x^q − z_x) W^q[k, n] + b^q[n]`` (reference)."""
    acc = (x_q.astype(np.int64) - np.int64(x_zero)) @ w_q.astype(np.int64)
    return acc if bias_q is None else acc + np.asarray(bias_q, np.int64)


def requantize(acc: np.ndarray, multiplier: np.ndarray, zero: int, qtype: IntType) -> np.ndarray:
    """``q_y = clip(round_half_even(M · acc) + z_y)`` with ``M = s_x s_w / s_y``."""
    y = np.rint(acc.astype(np.float64) * np.asarray(multiplier, np.float64)) + zero
    return np.clip(y, qtype.qmin, qtype.qmax).astype(qtype.numpy_dtype)


# --- error measures --------------------------------------------------------------------------


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``20·log10(‖x‖ / ‖x − x̂‖)`` in dB."""
    reference = np.asarray(reference, np.float64)
    noise = np.linalg.norm(reference - np.asarray(approximation, np.float64))
    signal = np.linalg.norm(reference)
    if noise == 0.0:
        return math.inf
    return float(20.0 * np.log10(max(signal, 1e-300) / noise))


def cosine(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cosine similarity along ``axis``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = np.sum(a * b, axis=axis)
    den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    return num / np.maximum(den, 1e-300)
