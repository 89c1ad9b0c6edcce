"""Emit packed 4-bit MatMul weights as qcompile's ``Int4MatMul`` custom op (``--target ort-cuda``).

``Int4MatMul(A, B, scales, zero_points)`` (domain ``qcompile``, ``runtime.custom_ops``) computes
``Y = A · W`` with dequantization fused into the matmul::

    W[k, n] = scales[n, j] · (u[k, n] − zero_points[n, j])            j = k // g

* ``B: [N, ceil(K/g), g/2]`` uint8, 4-bit codes ``u`` of column n, group j, even k in the low
  nibble (K not a multiple of g: the last group is zero-padded; the kernel reads K values);
* ``scales``, ``zero_points``: float16 ``[N, ceil(K/g)]``; a float zero point covers every form
  a PackedWeight takes except codebooks:

  * affine unsigned: ``u = q``, ``zp = z``;
  * affine signed (symmetric): ``u = q + 2^(b−1)``, ``zp = z + 2^(b−1)``;
  * offset (GGUF Q4_1 kept as it is): ``s · q + m = s · (q − (−m/s))``: ``zp = −m/s``.

fp16 parameters are the only difference from ``MatMulNBits``/``DequantizeLinear`` (fp32):
integer zero points stay exact, scales and offsets round to fp16 (relative 2⁻¹¹).

What Int4MatMul cannot express — codebooks, more than 4 bits (the 8-bit LM head), an odd group,
codes outside [0, 15], scales that fp16 cannot hold, an offset block with a zero scale — goes to
``EmitMatMulNBitsPass`` (its own fallbacks included), listed in ``fallbacks``. Without the
library built (``make runtime``) every weight goes there, and ``summary`` says so.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from passes import emit_dequantize_linear as dq
from passes.emit_matmulnbits import EmitMatMulNBitsPass, pack
from qcompiler import ir_utils
from qcompiler.packed_weight import PackedWeight
from runtime import custom_ops

DOMAIN = custom_ops.DOMAIN
FP16_MAX = float(np.finfo(np.float16).max)


def unsupported(packed: PackedWeight) -> str | None:
    """Why Int4MatMul cannot express ``packed`` (None: it can)."""
    if packed.form == "codebook":
        return "codebook: Int4MatMul has no table lookup"
    if packed.bits > 4:
        return f"{packed.bits}-bit: Int4MatMul takes at most 4 bits"
    k = packed.shape[0]
    if min(packed.group_size, k) % 2:
        return f"group size {min(packed.group_size, k)} is odd: groups pack two codes a byte"
    shift = _shift(packed)
    if int(packed.q.min()) + shift < 0 or int(packed.q.max()) + shift > 15:
        return "q outside the 4-bit range"
    if packed.form == "offset" and np.any(packed.scale == 0):
        return "offset block with a zero scale: no zero point −m/s"
    scale, zero = parameters(packed)
    if not (np.isfinite(scale).all() and np.isfinite(zero).all()):
        return "scales or zero points beyond float16"
    if np.any((scale == 0) & (packed.scale != 0).T):
        return "scales below float16's range"
    return None


def _shift(packed: PackedWeight) -> int:
    return 1 << (packed.bits - 1) if packed.signed else 0


def parameters(packed: PackedWeight) -> tuple[np.ndarray, np.ndarray]:
    """``(scales, zero_points)`` float16 ``[N, ceil(K/g)]`` (module docstring)."""
    shift = _shift(packed)
    scale = packed.scale.astype(np.float32)
    if packed.form == "offset":
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = shift - packed.offset.astype(np.float32) / scale
    elif packed.zero_point is not None:
        zero = packed.zero_point.astype(np.float32) + shift
    else:
        zero = np.full(scale.shape, shift, np.float32)
    with np.errstate(over="ignore"):
        return (np.ascontiguousarray(scale.T.astype(np.float16)),
                np.ascontiguousarray(zero.T.astype(np.float16)))


def int4_inputs(packed: PackedWeight) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(group_size, B, scales, zero_points)`` for ``packed``."""
    (k, n), g = packed.shape, min(packed.group_size, packed.shape[0])
    blocks = -(-k // g)
    padded = np.zeros((blocks * g, n), np.uint8)
    padded[:k] = packed.q.astype(np.int32) + _shift(packed)
    weights = pack(padded.T.reshape(n, blocks, g), 4)
    return (g, weights, *parameters(packed))


def dequantized(packed: PackedWeight) -> np.ndarray:
    """The float32 ``W: [K, N]`` Int4MatMul computes with (fp16 parameters), for references."""
    g, _, scale, zero = int4_inputs(packed)
    k = packed.shape[0]
    group = np.arange(k) // g
    u = (packed.q.astype(np.int32) + _shift(packed)).astype(np.float32)
    return (scale.astype(np.float32)[:, group].T * (u - zero.astype(np.float32)[:, group].T)).astype(np.float32)


def emit(graph: ir.Graph, node: ir.Node, packed: PackedWeight) -> None:
    """Replace ``node`` (``x @ W``) by one Int4MatMul on ``packed``."""
    k, n = packed.shape
    g, weights, scales, zeros = int4_inputs(packed)
    b = ir_utils.NodeBuilder(graph, node, dq.node_label(node))
    inputs = [node.inputs[0], b.const("weight_int4", weights), b.const("weight_scales", scales),
              b.const("weight_zero_points", zeros)]
    y = b.op("Int4MatMul", inputs, "int4_matmul", domain=DOMAIN, K=k, N=n, group_size=g)
    y.producer().meta[dq.EMITTED_KEY] = f"int4matmul/{packed.form}"
    ir_utils.replace_output(node.outputs[0], y)
    graph.remove(node, safe=True)


class EmitInt4MatMulPass(ir.passes.InPlacePass):
    """Emit every packed MatMul weight Int4MatMul can express as that op, the rest through
    ``EmitMatMulNBitsPass`` (module docstring).

    ``library``: whether qcompile's custom-op library is built (default: look); without it
    nothing is emitted as Int4MatMul. After a run, ``fallbacks`` lists ``(node, reason)`` for
    the weights left to MatMulNBits and ``summary`` both.
    """

    def __init__(self, library: bool | None = None) -> None:
        super().__init__()
        self.library = custom_ops.available() if library is None else library
        self.fallbacks: list[tuple[str, str]] = []
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fallbacks, emitted = [], 0
        if self.library:
            for node, packed in dq.pending(model):
                reason = dq.refusal(node, packed) or unsupported(packed)
                if reason:
                    self.fallbacks.append((dq.node_label(node), reason))
                    continue
                emit(model.graph, node, packed)
                emitted += 1
        if emitted:
            model.opset_imports.setdefault(DOMAIN, 1)
            dq.remove_dead(model)
        rest = EmitMatMulNBitsPass()
        modified = rest(model).modified or bool(emitted)
        self.summary = self._summary(emitted, rest.summary)
        return ir.passes.PassResult(model, modified=modified)

    def _summary(self, emitted: int, rest: str) -> str:
        parts = [f"{emitted} Int4MatMul"] if emitted else []
        if not self.library:
            parts.append("custom-op library not built (make runtime): MatMulNBits instead")
        elif self.fallbacks:
            reasons = collections.Counter(reason for _, reason in self.fallbacks)
            parts.append("not Int4MatMul: " + "; ".join(f"{r}: {c}" for r, c in reasons.items()))
        if rest:
            parts.append(rest)
        return ", ".join(parts)
