"""Emit packed MatMul weights as ONNX Runtime's ``com.microsoft.MatMulNBits``.

``MatMulNBits(A, B, scales[, zero_points])`` computes ``Y = A · W`` with, for column ``n`` and
block ``j`` of ``block_size`` rows along K::

    W[k, n] = (u[k, n] − zp[n, j]) · scales[n, j]                  j = k // block_size

* ``B: [N, ceil(K/bs), bs·bits/8]`` uint8: column n, block j, values packed low bits first
  (4-bit: even k in the low nibble); K not a multiple of bs is padded (ORT reads K values);
* ``scales: [N, ceil(K/bs)]`` float32; ``zero_points``: uint8 packed the same way,
  ``[N, ceil(blocks·bits/8)]``, or float32 ``[N, blocks]``; absent: ``2^(bits−1)``.

Our forms map onto it exactly (same numbers as ``EmitDequantizeLinearPass``):

* affine unsigned: ``u = q``, ``zp = z`` (packed uint8);
* affine signed (symmetric): ``s · (q − z) = s · ((q + 2^(b−1)) − (z + 2^(b−1)))``, so
  ``u = q + 2^(b−1)`` with the default zero point when ``z = 0``;
* offset: ``s · q + m = s · (q − (−m/s))``: a float zero point ``zp = −m/s``.

Blocks: groups of ``g`` rows become blocks of ``bs`` = the largest power of two in [16, 256]
(ORT 1.31 CPU accepts exactly 16, 32, 64, 128, 256) dividing ``g``, each ``bs`` block inside one
group, its scale repeated (identical numbers). Per-channel (``g = K``, e.g. 576 → 64,
1536 → 256): any block works since a column has one scale; 32 when no such power divides K.

ORT 1.31 CPU limits, measured: bits 2, 4 and 8 only (3, 5–7 fail at session creation); float
zero points only for 2 and 4 bits (8 fails at run time). What MatMulNBits cannot express —
codebooks, other bit widths, groups with no such block (g < 16 or odd), 8-bit offsets, offset
blocks with a zero scale — falls back to the DequantizeLinear form for that node (listed in
``fallbacks``). ``accuracy_level`` 0 computes in float32 (≈1e-6 relative to the float product);
4 quantizes A to int8 per block inside the kernel (faster, ≈5e-3 relative).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from passes import emit_dequantize_linear as dq
from qcompiler import ir_utils
from qcompiler.packed_weight import PackedWeight

MS = "com.microsoft"
SUPPORTED_BITS = (2, 4, 8)
BLOCK_SIZES = (256, 128, 64, 32, 16)  # ORT 1.31 CPU
FLOAT_ZERO_POINT_BITS = (2, 4)


def block_size(group_size: int, k: int) -> int | None:
    """The MatMulNBits block for groups of ``group_size`` rows (None: no such block)."""
    g = min(group_size, k)
    for bs in BLOCK_SIZES:
        if g % bs == 0:
            return bs
    return 32 if g == k else None  # per-channel: every block of a column shares its scale


def unsupported(packed: PackedWeight) -> str | None:
    """Why MatMulNBits cannot express ``packed`` (None: it can)."""
    if packed.form == "codebook":
        return "codebook: MatMulNBits has no table lookup"
    if packed.bits not in SUPPORTED_BITS:
        return f"{packed.bits}-bit: ORT MatMulNBits takes 2, 4 or 8 bits"
    shift = _shift(packed)
    if int(packed.q.min()) + shift < 0 or int(packed.q.max()) + shift >= 1 << packed.bits:
        return f"q outside the {packed.bits}-bit range"
    if block_size(packed.group_size, packed.shape[0]) is None:
        return f"group size {packed.group_size}: no power-of-two block in [16, 256] divides it"
    if packed.form == "offset" and packed.bits not in FLOAT_ZERO_POINT_BITS:
        return f"{packed.bits}-bit offset: ORT CPU takes float zero points for 2 and 4 bits only"
    if packed.form == "offset" and np.any(packed.scale == 0):
        return "offset block with a zero scale: no zero point −m/s"
    return None


def _shift(packed: PackedWeight) -> int:
    """What makes ``q`` unsigned: ``2^(b−1)`` for signed ``q``, else 0."""
    return 1 << (packed.bits - 1) if packed.signed else 0


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis into uint8, ``8/bits`` values a byte, the first in the low bits
    (zero-padded to whole bytes)."""
    per = 8 // bits
    pad = -values.shape[-1] % per
    v = np.pad(values.astype(np.uint8), [(0, 0)] * (values.ndim - 1) + [(0, pad)])
    v = v.reshape(*v.shape[:-1], -1, per) << (np.arange(per, dtype=np.uint8) * bits)
    return np.bitwise_or.reduce(v, axis=-1).astype(np.uint8)


def matmulnbits_inputs(packed: PackedWeight) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(block_size, B, scales, zero_points or None)`` for ``packed`` (module docstring)."""
    (k, n), bits = packed.shape, packed.bits
    bs = block_size(packed.group_size, k)
    blocks = -(-k // bs)
    group = (np.arange(blocks) * bs) // min(packed.group_size, k)  # the group of each block
    shift = _shift(packed)
    u = packed.q.astype(np.int32) + shift
    if packed.form == "offset":  # s·q + m = s·(u − (shift − m/s))
        zero = (shift - packed.offset / packed.scale)[group].T.astype(np.float32)
    elif packed.zero_point is not None and np.any(packed.zero_point != 0):
        zero = pack(packed.zero_point[group].T.astype(np.int32) + shift, bits)
    else:
        zero = None if packed.signed else pack(np.zeros((n, blocks), np.uint8), bits)
    padded = np.zeros((blocks * bs, n), np.uint8)
    padded[:k] = u
    weights = pack(padded.T.reshape(n, blocks, bs), bits)
    scales = packed.scale[group].T.astype(np.float32)
    return bs, weights, np.ascontiguousarray(scales), zero


def emit(graph: ir.Graph, node: ir.Node, packed: PackedWeight, accuracy_level: int) -> None:
    """Replace ``node`` (``x @ W``) by one MatMulNBits on ``packed``."""
    k, n = packed.shape
    bs, weights, scales, zero = matmulnbits_inputs(packed)
    b = ir_utils.NodeBuilder(graph, node, dq.node_label(node))
    inputs = [node.inputs[0], b.const("weight_packed", weights), b.const("weight_scales", scales)]
    if zero is not None:
        inputs.append(b.const("weight_zero_points", np.ascontiguousarray(zero)))
    y = b.op("MatMulNBits", inputs, "matmulnbits", domain=MS, K=k, N=n, bits=packed.bits,
             block_size=bs, accuracy_level=accuracy_level)
    y.producer().meta[dq.EMITTED_KEY] = f"matmulnbits/{packed.form}"
    ir_utils.replace_output(node.outputs[0], y)
    graph.remove(node, safe=True)


class EmitMatMulNBitsPass(ir.passes.InPlacePass):
    """Emit every packed MatMul weight as ``com.microsoft.MatMulNBits``; what it cannot
    express falls back to ``EmitDequantizeLinearPass``'s form for that node (module docstring).

    ``accuracy_level``: MatMulNBits' attribute (0: float32 compute; 4: int8 activations inside
    the kernel, faster and inexact). After a run, ``fallbacks`` lists ``(node, reason)`` for the
    nodes emitted with DequantizeLinear, ``skipped`` those left float, ``summary`` both.
    """

    def __init__(self, accuracy_level: int = 0) -> None:
        super().__init__()
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0–4, got {accuracy_level}")
        self.accuracy_level = accuracy_level
        self.fallbacks: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str]] = []
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        todo, self.fallbacks, self.skipped = [], [], []
        for node, packed in dq.pending(model):
            reason = dq.refusal(node, packed)
            if reason:
                self.skipped.append((dq.node_label(node), reason))
                continue
            fallback = unsupported(packed)
            if fallback:
                self.fallbacks.append((dq.node_label(node), fallback))
            todo.append((node, packed, fallback))
        modified = bool(self.fallbacks) and dq.require_opset(model)
        emitted = 0
        for node, packed, fallback in todo:
            if node.graph is not model.graph:  # dropped as dead by the version converter
                continue
            if fallback:
                dq.emit(model.graph, node, packed)
            else:
                emit(model.graph, node, packed, self.accuracy_level)
                emitted += 1
        if emitted:
            model.opset_imports.setdefault(MS, 1)
        if todo:
            dq.remove_dead(model)
        self.summary = self._summary(emitted)
        return ir.passes.PassResult(model, modified=modified or bool(todo))

    def _summary(self, emitted: int) -> str:
        parts = [f"{emitted} MatMulNBits"] if emitted else []
        if self.fallbacks:
            reasons = collections.Counter(reason for _, reason in self.fallbacks)
            parts.append(f"{len(self.fallbacks)} DequantizeLinear fallbacks ("
                         + "; ".join(f"{r}: {c}" for r, c in reasons.items()) + ")")
        if self.skipped:
            parts.append(f"{len(self.skipped)} left float: "
                         + "; ".join(f"{n} ({r})" for n, r in self.skipped))
        return ", ".join(parts)
