"""Emit packed MatMul weights in standard ONNX: low-bit storage + DequantizeLinear (opset 21).

For ``y = x W`` with a constant ``W: [K, N]`` whose MatMul carries a ``PackedWeight``
(``node.meta[WEIGHT_KEY]``, blocks of ``g`` rows along K, ``g = K`` per-channel), the float
weight is replaced by integer storage and nodes computing the same ``W`` (portable: TensorRT,
ONNX Runtime, any opset-21 runtime)::

    affine    W = s · (q − z)        MatMul(x, DequantizeLinear(q, s, z, axis=0, block_size=g))
              per-channel (one block): DequantizeLinear(q, s[N], z[N], axis=1)
    offset    W = s · q + m          MatMul(x, DequantizeLinear(q, s)) + MatMul(blocksum(x), m)
    codebook  W[k, n] = C[n, i[k, n]]    MatMul(x, Gather(flat(C), Cast(i, int32) + n · 2^b))

Storage: ``q`` (and ``z``, omitted when all zero, e.g. symmetric) is INT4/UINT4 for 2–4 bits
(3- and 2-bit values live in the 4-bit types) and INT8/UINT8 for 5–8 bits; codebook indices
are UINT4 (b ≤ 4) or UINT8. ONNX Runtime 1.31 CPU runs ``Cast`` from UINT4 to INT32 and
blocked ``DequantizeLinear`` on all four types (ragged last block included).

The offset form (GGUF Q4_1 grids) has a float minimum ``m`` per block and no integer zero
point. With blocks ``B_j = [j·g, (j+1)·g)`` and ``j(k)`` the block of row ``k``::

    (x W)_n = Σ_k x_k (s_{j(k)n} q_{kn} + m_{j(k)n})
            = Σ_k x_k s_{j(k)n} q_{kn}  +  Σ_j (Σ_{k∈B_j} x_k) m_{jn}
            = (x · DQ(q, s))_n          +  (blocksum(x) · m)_n

``blocksum(x) = ReduceSum(Reshape(x, [..., K/g, g]), axis=-1)`` is ``[..., K/g]`` and
``m: [K/g, N]``: an exact identity, only the float summation order differs. When ``g`` does not
divide K, x is first zero-padded to ``ceil(K/g)·g`` channels (the padding adds nothing).

The float weight (and the view ops it was read through) goes when nothing else reads it
(onnx_ir's dead-code elimination): a tied LM head ``MatMul(h, Transpose(E))`` loses the Transpose, the embedding Gather keeps ``E``.
The model is brought to opset 21 first (onnxscript's version converter, which adapts ops whose
meaning changed, e.g. GroupNormalization) and to IR version 10 (4-bit types). Idempotent: an
emitted MatMul is marked ``node.meta[EMITTED_KEY]``.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.version_converter import ConvertVersionPass

from qcompiler import ir_utils
from qcompiler.packed_weight import WEIGHT_KEY, PackedWeight

EMITTED_KEY = "qcompile.weight_emitted"  # node.meta: how this MatMul's packed weight was emitted
OPSET = 21  # blocked DequantizeLinear, INT4/UINT4
IR_VERSION = 10  # INT4/UINT4 tensors


def storage(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """``values`` in the storage type: (U)INT4 for ``bits ≤ 4``, (U)INT8 otherwise."""
    if bits <= 4:
        return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return values.astype(np.int8 if signed else np.uint8)


def refusal(node: ir.Node, packed: PackedWeight) -> str | None:
    """Why ``node``'s packed weight cannot be emitted (None: it can). Never edits the graph."""
    if node.op_type != "MatMul" or node.domain != "":
        return f"{node.op_type} is not a MatMul"
    weight = ir_utils.constant_through_views(node.inputs[1])
    if weight is None:
        return "the weight input is not a constant"
    if weight.dtype != np.float32:
        return f"{weight.dtype} weight: only float32 is emitted"
    if weight.shape != packed.shape:
        return f"packed weight {packed.shape} does not match the weight {weight.shape}"
    x_shape = node.inputs[0].shape
    if x_shape and isinstance(x_shape[-1], int) and x_shape[-1] != packed.shape[0]:
        return f"input's last dimension {x_shape[-1]} is not K = {packed.shape[0]}"
    if packed.form == "codebook":
        lo, hi = 0, min(packed.codebook.shape[1], 16 if packed.bits <= 4 else 256) - 1
    else:
        width = 4 if packed.bits <= 4 else 8
        lo, hi = (-(1 << width - 1), (1 << width - 1) - 1) if packed.signed else (0, (1 << width) - 1)
    if packed.q.min() < lo or packed.q.max() > hi:
        return f"q outside [{lo}, {hi}] ({packed.form}, {packed.bits} bits)"
    return None


def emit(graph: ir.Graph, node: ir.Node, packed: PackedWeight) -> None:
    """Replace ``node``'s float weight by ``packed`` in one of the three forms (module docstring)."""
    b = ir_utils.NodeBuilder(graph, node, node_label(node))
    weight = node.inputs[1]
    if packed.form == "offset":
        x = node.inputs[0]
        main = b.op("MatMul", [x, _dequantize(b, packed, with_zero_point=False)], "matmul")
        sums = _block_sums(b, x, packed.group_size, packed.shape[0])
        minimum = b.const("weight_offset", packed.offset.astype(np.float32))
        offsets = b.op("MatMul", [sums, minimum], "offset_matmul")
        ir_utils.replace_output(node.outputs[0], b.op("Add", [main, offsets], "add_offset"))
        graph.remove(node, safe=True)
        marked = main.producer()
    else:
        decoded = _decode(b, packed) if packed.form == "codebook" else _dequantize(b, packed)
        decoded.type, decoded.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(packed.shape)
        node.replace_input_with(1, decoded)
        marked = node
    marked.meta[EMITTED_KEY] = f"dequantize_linear/{packed.form}"


def _dequantize(b: ir_utils.NodeBuilder, packed: PackedWeight, with_zero_point: bool = True) -> ir.Value:
    """``DequantizeLinear(q, s[, z])``: ``[K, N]`` float32."""
    per_channel = packed.scale.shape[0] == 1  # one block: DequantizeLinear's per-axis form
    scale = packed.scale.reshape(-1) if per_channel else packed.scale
    inputs = [
        b.const("weight_q", storage(packed.q, packed.bits, packed.signed)),
        b.const("weight_scale", scale.astype(np.float32)),
    ]
    zero = packed.zero_point
    if with_zero_point and zero is not None and np.any(zero != 0):
        zero = zero.reshape(-1) if per_channel else zero
        inputs.append(b.const("weight_zero", storage(zero, packed.bits, packed.signed)))
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": packed.group_size}
    return b.op("DequantizeLinear", inputs, "weight_dequantized", **attrs)


def _decode(b: ir_utils.NodeBuilder, packed: PackedWeight) -> ir.Value:
    """``Gather(flat(C), Cast(i) + n · 2^b)``: ``[K, N]`` float32 (no offset for one codebook)."""
    codebook = packed.codebook.astype(np.float32)
    index = b.op("Cast", [b.const("weight_index", storage(packed.q, packed.bits, signed=False))],
                 "index_int32", to=ir.DataType.INT32)
    if codebook.shape[0] > 1:  # per-column codebooks: row n of C starts at n · 2^b
        starts = np.arange(packed.shape[1], dtype=np.int32) * np.int32(codebook.shape[1])
        index = b.op("Add", [index, b.const("codebook_row_start", starts)], "flat_index")
    return b.op("Gather", [b.const("codebook", codebook.reshape(-1)), index], "weight_decoded", axis=0)


def _block_sums(b: ir_utils.NodeBuilder, x: ir.Value, g: int, k: int) -> ir.Value:
    """``Σ_{k∈B_j} x_k``: ``[..., ceil(K/g)]`` (module docstring)."""
    last = b.const("sum_axes", np.array([-1], np.int64))
    if g >= k:
        return b.op("ReduceSum", [x, last], "block_sums", keepdims=1)
    blocks, rank = -(-k // g), None if x.shape is None else len(x.shape)
    if blocks * g != k:  # ragged last block: pad x with zero channels
        pads = np.array([0, blocks * g - k], np.int64)
        axes = b.const("pad_axes", np.array([-1], np.int64))
        x = b.op("Pad", [x, b.const("channel_pads", pads), None, axes], "pad_channels")
    tail = np.array([blocks, g], np.int64)
    if rank is not None:  # [0, …, 0, K/g, g]: a 0 copies that dimension of x
        shape = b.const("block_shape", np.concatenate([np.zeros(rank - 1, np.int64), tail]))
    else:
        lead = b.op("Shape", [x], "leading_dims", end=-1)
        shape = b.op("Concat", [lead, b.const("block_tail", tail)], "block_shape", axis=0)
    blocked = b.op("Reshape", [x, shape], "channel_blocks")
    return b.op("ReduceSum", [blocked, last], "block_sums", keepdims=0)


def remove_dead(model: ir.Model) -> None:
    """Drop the float weights (and the view ops they were read through) nothing reads now."""
    common.RemoveUnusedNodesPass()(model)


def require_opset(model: ir.Model, version: int = OPSET) -> bool:
    """Bring the default domain to ``version`` (and IR version 10); True if the model changed."""
    changed = False
    if model.opset_imports.get("", 1) < version:
        ConvertVersionPass(version)(model)
        changed = True
    if model.ir_version < IR_VERSION:
        model.ir_version, changed = IR_VERSION, True
    return changed


def pending(model: ir.Model) -> list[tuple[ir.Node, PackedWeight]]:
    """MatMuls with a packed weight not yet emitted, in graph order."""
    graph = model.graph
    return [(n, n.meta[WEIGHT_KEY]) for n in graph if WEIGHT_KEY in n.meta and EMITTED_KEY not in n.meta]


def node_label(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or node.op_type


class EmitDequantizeLinearPass(ir.passes.InPlacePass):
    """Emit every packed MatMul weight as 4/8-bit storage + DequantizeLinear (or a codebook
    Gather), in standard opset-21 ONNX (module docstring).

    After a run, ``skipped`` lists ``(node, reason)`` for the MatMuls left float and
    ``summary`` says what was emitted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[tuple[str, str]] = []
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        todo, self.skipped = [], []
        for node, packed in pending(model):
            reason = refusal(node, packed)
            if reason:
                self.skipped.append((node_label(node), reason))
            else:
                todo.append((node, packed))
        modified = bool(todo) and require_opset(model)
        forms = collections.Counter()
        for node, packed in todo:
            if node.graph is model.graph:  # the version converter drops dead nodes
                emit(model.graph, node, packed)
                forms[packed.form] += 1
        if forms:
            remove_dead(model)
        self.summary = _summary(forms, self.skipped)
        return ir.passes.PassResult(model, modified=modified or bool(forms))


def _summary(forms: collections.Counter, skipped: list[tuple[str, str]]) -> str:
    done = ", ".join(f"{form} {count}" for form, count in sorted(forms.items()))
    text = f"{sum(forms.values())} MatMul weights emitted ({done})" if forms else ""
    if skipped:
        left = "; ".join(f"{n} ({r})" for n, r in skipped)
        text += ("; " if text else "") + f"{len(skipped)} left float: {left}"
    return text
