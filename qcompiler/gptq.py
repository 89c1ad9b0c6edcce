"""GPTQ weight quantization (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"); math only, no graph code.

Our weights are ``W: [K, N]`` with ``y = x W``, so the input features that GPTQ quantizes one at a
time (its "columns") are the *rows* ``w_i`` of ``W``. For calibration inputs ``X: [n, K]`` the
layer's proxy loss is the output error

    E(Ŵ) = (1/n) ‖X W − X Ŵ‖²_F = ½ Σ_c ΔW[:, c]ᵀ H ΔW[:, c],      H = 2/n · XᵀX,  ΔW = W − Ŵ

(one independent quadratic per output channel ``c``, all sharing ``H``). Quantizing row ``i`` to
``ŵ_i`` while the not-yet-quantized rows ``F`` (``i ∈ F``) absorb the error optimally (OBS) costs
``δE_i = ‖w_i − ŵ_i‖² / (2 [H_F⁻¹]_ii)`` and moves every ``j ∈ F`` by

    w_j ← w_j − [H_F⁻¹]_ji / [H_F⁻¹]_ii · (w_i − ŵ_i).

In a fixed row order these inverses of shrinking sub-matrices all come from one upper Cholesky
factor ``U`` of ``H⁻¹ = Uᵀ U``: ``[H_F⁻¹]_ii = U_ii²`` and ``[H_F⁻¹]_ji = U_ii U_ij``. With
``e_i = (w_i − ŵ_i) / U_ii`` the update is ``w_j ← w_j − U_ij e_i`` (``j > i``) and
``δE_i = ‖e_i‖² / 2``. Lazy batching applies these updates row by row only inside a block of
rows, and to everything after the block in one matmul ``W[b1:] −= U[b0:b1, b1:]ᵀ E`` when the
block ends (same result, fewer memory passes).

Numerical guards, as in the reference implementation: inputs that never fire (``H_ii = 0``) get
``H_ii = 1`` and their row of ``W`` is zeroed; ``λ = damp · mean(diag H)`` is added to the diagonal
(and multiplied by 10, a few times, while the Cholesky factorization fails).

Quantization parameters are those of round-to-nearest (``quant_math``: symmetric or affine with
``affine_params``' widening to contain 0 and ``MIN_SCALE``), half-to-even rounding, clipped to the
integer type; the integers stored are exactly those whose error was compensated.

Clipping search (``clip_ratios``, as the reference ``find_params(mse=True)``): when a group's
parameters are fixed, each output column ``c`` takes the range ratio ``r`` (range ``[r·min,
r·max]``, symmetric ``±r·max|w|``) minimising the group's weighted rounding error

    e_c(r) = Δ_c(r)ᵀ H_gg Δ_c(r),      Δ_c(r) = w_gc − Q_r(w_gc)   (round to nearest at ratio r)

``H_gg``: the group's diagonal block of ``H`` (the layer-output error of that rounding alone).
``r = 1`` is tried first and kept on ties, so no group's ``e_c`` exceeds min-max's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from qcompiler import quant_math as qm

if TYPE_CHECKING:  # torch is imported lazily: this module imports without it
    import torch

# How many times the dampening is multiplied by 10 after a failed Cholesky factorization.
DAMP_RETRIES = 4
# Range ratios of the clipping search (``clip_ratios``): 1, 0.975, …, 0.75.
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(11))


class HessianAccumulator:
    """Streams ``XᵀX`` (float64, ``[K, K]`` whatever the number of rows) over calibration batches.

    ``update(x)`` takes activations whose last dimension is ``K`` (``[n, K]``, or ``[batch, seq,
    K]``, flattened to rows); ``hessian()`` returns ``H = 2/n · XᵀX`` over all ``n`` rows seen.
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"K must be positive, got {k}")
        self.k = k
        self.rows = 0
        self._xtx = np.zeros((k, k), np.float64)

    def update(self, x_rows: np.ndarray) -> None:
        x = np.asarray(x_rows)
        if x.shape[-1] != self.k:
            raise ValueError(f"expected rows of {self.k} features, got shape {x.shape}")
        x = x.reshape(-1, self.k).astype(np.float64, copy=False)
        self._xtx += x.T @ x
        self.rows += x.shape[0]

    def hessian(self) -> np.ndarray:
        if self.rows == 0:
            raise ValueError("no rows accumulated")
        return self._xtx * (2.0 / self.rows)


@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """``quantized``: integers and parameters laid out exactly as ``WeightFormat.quantize``
    (``q: [K, N]``, params ``[ceil(K/g), N]`` or ``[1, N]``). ``loss``: the GPTQ proxy loss
    ``Σ_i ‖e_i‖² / 2 = ½ Σ_c ΔW[:, c]ᵀ H_λ ΔW[:, c]`` for the damped Hessian ``H_λ`` and ``W`` with
    dead rows zeroed; with ``H = 2/n XᵀX`` and small damping it is ``(1/n) ‖X(W − Ŵ)‖²_F``.
    ``damp``: the relative dampening actually used (larger than asked if Cholesky needed it)."""

    quantized: qm.QuantizedTensor
    loss: float
    damp: float


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    fmt: qm.WeightFormat,
    *,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    device: str = "cpu",
    clip_ratios: tuple[float, ...] = (1.0,),
) -> GPTQResult:
    """Quantize ``W: [K, N]`` (``y = x W``) to ``fmt`` with GPTQ, given ``H: [K, K]`` (e.g.
    ``HessianAccumulator.hessian()``).

    Group parameters: per-channel (``group_size=None``) from the whole original column; groups
    without act-order from the *current, error-compensated* rows of a group when its first row
    is reached (lazy blocks are also cut at group starts so those rows are fully up to date);
    with ``act_order`` rows are processed in order of decreasing ``diag(H)`` and groups are
    *static*: parameters computed up front from the original weights for the contiguous groups
    in the original order, so the result stays a plain contiguous-block format (what
    ``DequantizeLinear`` with ``block_size`` expresses). ``clip_ratios``: the clipping search's
    range ratios for every group's parameters (``(1.0,)``: min-max, no search).

    Inverse and Cholesky in float64, row updates in float32 with torch on ``device`` (``"cuda"``
    when asked and available, else CPU, where it runs on one thread: see ``_one_cpu_thread``).
    """
    import torch

    w = np.asarray(w, np.float32)
    h = _checked_hessian(w, hessian, damp, block_size)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w_live = np.where(dead[:, None], np.float32(0), w)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(w.shape[0])
    dev = torch.device(device if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    search = _ClipSearch(fmt, tuple(clip_ratios))
    static = None if (fmt.group_size is not None and not act_order) else search.static(w, h)
    with _one_cpu_thread(dev):
        u, used_damp = _inverse_cholesky_upper(h[np.ix_(perm, perm)], damp, dev)
        w_t = torch.from_numpy(w_live[perm]).to(dev)
        q, scale, zero, loss = _gptq_rows(w_t, u, search, static, perm, block_size, h)
    q = q[np.argsort(perm)].astype(fmt.qtype.numpy_dtype)
    return GPTQResult(qm.QuantizedTensor(q, scale, zero, fmt.block(w.shape)), loss, used_damp)


def _checked_hessian(w: np.ndarray, hessian: np.ndarray, damp: float, block_size: int) -> np.ndarray:
    if w.ndim != 2:
        raise ValueError(f"W must be [K, N], got shape {w.shape}")
    h = np.array(hessian, np.float64)  # a copy: we edit its diagonal
    if h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"H must be [{w.shape[0]}, {w.shape[0]}] for W {w.shape}, got {h.shape}")
    if not damp > 0 or block_size < 1:
        raise ValueError(f"need damp > 0 and block_size >= 1, got {damp}, {block_size}")
    return h


def _inverse_cholesky_upper(h: np.ndarray, damp: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Upper ``U`` with ``(H + λI)⁻¹ = Uᵀ U``, ``λ = damp · mean(diag H)``, float64 then cast to
    float32; ``damp`` grows ×10 (``DAMP_RETRIES`` times) while a factorization fails."""
    import torch

    h_t = torch.from_numpy(h).to(device)
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=device)
    mean_diag = float(np.mean(np.diag(h)))
    for _ in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h_t + damp * mean_diag * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and bool(torch.isfinite(upper).all()):
                return upper.to(torch.float32), damp
        damp *= 10.0
    raise np.linalg.LinAlgError(f"Cholesky of the Hessian failed even with damp={damp / 10:g}")


def _gptq_rows(
    w: torch.Tensor,
    u: torch.Tensor,
    search: _ClipSearch,
    static: qm.QuantizedTensor | None,
    perm: np.ndarray,
    block_size: int,
    h: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The lazy-block GPTQ loop over the (permuted) rows of ``w`` (edited in place).

    Returns ``q`` (permuted order, float), the parameters ``[G, N]`` and the proxy loss.
    ``static`` holds fixed parameters (per-channel or act-order groups); without it a group's
    parameters come from its current rows when its first row starts a block (``perm`` is then
    the identity and ``h`` the undamped Hessian, whose diagonal blocks weight the search)."""
    import torch

    fmt = search.fmt
    g = None if static is not None else fmt.group_size
    if g is None:
        row_scale, row_zero = _row_params(static, perm, w.device)
    else:
        row_scale, row_zero = torch.empty_like(w), torch.empty_like(w)
    params, q, loss = [], torch.empty_like(w), 0.0
    for b0, b1 in _block_bounds(w.shape[0], block_size, g):
        if g is not None and b0 % g == 0:
            params.append(search.params(w[b0 : b0 + g].cpu().numpy(), h[b0 : b0 + g, b0 : b0 + g]))
            row_scale[b0 : b0 + g] = torch.from_numpy(params[-1][0]).to(w.device)
            row_zero[b0 : b0 + g] = torch.from_numpy(params[-1][1].astype(np.float32)).to(w.device)
        err = _quantize_block(w[b0:b1].clone(), u[b0:b1, b0:b1], row_scale[b0:b1], row_zero[b0:b1],
                              fmt.qtype, q[b0:b1])
        w[b1:] -= u[b0:b1, b1:].T @ err
        loss += float(torch.sum(err.double() ** 2)) / 2
    if g is None:
        return q.cpu().numpy(), static.scale, static.zero_point, loss
    scales, zeros = zip(*params)
    return q.cpu().numpy(), np.concatenate(scales), np.concatenate(zeros), loss


def _quantize_block(w1, u1, scale, zero, qtype: qm.IntType, q_out) -> torch.Tensor:
    """Row by row inside one block: ``q_i = clip(round(w_i / s) + z)``, ``e_i = (w_i − s(q_i − z)) /
    U_ii``, ``w_j −= U_ij e_i`` for the block's later rows ``j``. Writes ``q_out``, returns ``E``."""
    err = w1.new_empty(w1.shape)
    for i in range(w1.shape[0]):
        q_i = (w1[i] / scale[i]).round_().add_(zero[i]).clamp_(qtype.qmin, qtype.qmax)
        err[i] = (w1[i] - scale[i] * (q_i - zero[i])) / u1[i, i]
        w1[i + 1 :].addr_(u1[i, i + 1 :], err[i], alpha=-1)  # w_j −= U_ij e_i
        q_out[i] = q_i
    return err


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run on one CPU thread: the row loop is thousands of small ops, and on a busy machine every
    OpenMP barrier (there and inside LAPACK) can wait a scheduler slice, milliseconds each (a
    1536² Cholesky inverse measured 0.45 s on one thread, 1–4 s on two with the cores shared)."""
    import torch

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _block_bounds(k: int, block_size: int, group_size: int | None) -> list[tuple[int, int]]:
    """Lazy blocks ``[b0, b1)``: every ``block_size`` rows, and also at every group start."""
    starts = set(range(0, k, block_size)) | (set(range(0, k, group_size)) if group_size else set())
    edges = sorted(starts) + [k]
    return list(zip(edges[:-1], edges[1:]))


@dataclasses.dataclass(frozen=True)
class _ClipSearch:
    """Group parameters by the clipping search (module docstring); ``ratios=(1.0,)``: RTN's."""

    fmt: qm.WeightFormat
    ratios: tuple[float, ...]

    def params(self, rows: np.ndarray, h_block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Parameters ``[1, N]`` of one group ``rows: [g, N]`` (``h_block``: its ``[g, g]`` block of
        H): per column, the first ratio minimising ``Δᵀ H_gg Δ`` (``clipped_group_params``)."""
        return clipped_group_params(rows, h_block, self.fmt, self.ratios)

    def static(self, w: np.ndarray, h: np.ndarray) -> qm.QuantizedTensor:
        """Parameters of every contiguous group of the original ``W`` (act-order, per channel)."""
        g = self.fmt.group_size or w.shape[0]
        params = [self.params(w[b : b + g], h[b : b + g, b : b + g]) for b in range(0, w.shape[0], g)]
        scale, zero = np.concatenate([p[0] for p in params]), np.concatenate([p[1] for p in params])
        block = self.fmt.block(w.shape)
        return qm.QuantizedTensor(qm.quantize(w, scale, zero, self.fmt.qtype, block), scale, zero, block)


def clipped_group_params(
    rows: np.ndarray, h_block: np.ndarray | None, fmt: qm.WeightFormat, ratios: tuple[float, ...] = CLIP_RATIOS
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point ``[1, N]`` of one group ``W_g: [g, N]``: per column ``c`` the ratio
    ``r`` of ``ratios`` minimising ``e_c(r) = Δ_c(r)ᵀ H_gg Δ_c(r)`` (``H_gg = I`` when ``h_block``
    is None), ``Δ(r) = W_g − RTN_r(W_g)`` on the range ``[r·min, r·max]`` (``quant_math``'s
    ``range_params``). The first of equal minima wins: with 1.0 first, min-max on ties."""
    rows = np.asarray(rows, np.float32)
    lo, hi = rows.min(axis=0, keepdims=True), rows.max(axis=0, keepdims=True)
    h = None if h_block is None else np.asarray(h_block, np.float32)
    if len(ratios) == 1:  # nothing to compare
        return qm.range_params(np.float32(ratios[0]) * lo, np.float32(ratios[0]) * hi, fmt.qtype, fmt.symmetric)
    best = None
    for r in ratios:
        scale, zero = qm.range_params(np.float32(r) * lo, np.float32(r) * hi, fmt.qtype, fmt.symmetric)
        delta = rows - qm.dequantize(qm.quantize(rows, scale, zero, fmt.qtype), scale, zero)
        err = np.einsum("in,in->n", delta, delta if h is None else h @ delta, dtype=np.float64)
        if best is None:
            best = [err, scale, zero]
            continue
        better = err < best[0]
        best = [np.where(better, err, best[0]), np.where(better, scale, best[1]), np.where(better, zero, best[2])]
    return best[1], best[2].astype(fmt.qtype.numpy_dtype)


def _row_params(static: qm.QuantizedTensor, perm: np.ndarray, device: torch.device):
    """Fixed parameters expanded to one row per (permuted) row of ``W``, as float32 tensors."""
    import torch

    def rows(p: np.ndarray) -> torch.Tensor:
        full = qm.expand_params(p, static.block, static.q.shape)[perm].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(full)).to(device)

    return rows(static.scale), rows(static.zero_point)
