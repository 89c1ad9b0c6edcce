"""An 8-bit KV cache for a decoder graph with past key/values (``--kv-cache int8|fp8``).

A decoder exported with its cache (``models.smollm2_decode``, Optimum's exports) appends each
step's keys and values to the cache it was given::

    past_key_values.{i}.key [b, h, p, d] ─┐
                        new keys [b, h, s, d] ─┴→ Concat(axis=2) → present.{i}.key → attention

The pass makes the cache live in 8 bits between steps. Every entry is quantized once, when it
is written, with one scale per token and head (the ``d = 64`` values of one head vector)::

    s = max|k| / q_max  (stored as float16; q_max = 127 int8, 448 fp8)
    int8: k^q = clip(round_half_even(k / s), −127, 127)        fp8: k^q = E4M3(k / s), saturating

and dequantized when read, ``k̂ = s · k^q``. The interface becomes, per layer and kind::

    past_key_values.{i}.key  int8|float8e4m3fn [b, h, p, d]  + past_key_values.{i}.key_scale  float16 [b, h, p, 1]
    present.{i}.key          int8|float8e4m3fn [b, h, p+s, d] + present.{i}.key_scale         float16 [b, h, p+s, 1]

and attention reads the dequantized ``Concat(k̂_past, k̂_new)`` — the new entries too, so a
step sees exactly what later steps will read back. int8 entries are concatenated as int8;
ONNX ``Concat`` takes no float8, so the fp8 cache is dequantized, concatenated and quantized
again with the same scales, which gives back the same E4M3 values (a value ``s·q`` divided by
``s`` rounds to ``q``). Standard ops only (Abs, ReduceMax, Div, Round, Clip, Cast, Mul,
Concat): the graph runs on any ONNX runtime. Cache bytes per token and layer:
``2 · h · (d + 2)`` against ``2 · h · 2d`` in float16 (SmolLM2: 11,880 vs 23,040 bytes).

A graph without float ``past → Concat → present`` pairs is refused, unless the pass already
ran (its dtype is recorded in the metadata ``qcompile.kv_cache``): then nothing changes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler import ir_utils
from qcompiler.errors import QCompileError

METADATA_KEY = "qcompile.kv_cache"
SCALE_SUFFIX = "_scale"
SCALE_FLOOR = np.float32(1e-6)  # an all-zero head vector still gets a (float16-representable) scale
STORAGE = {
    "int8": (ir.DataType.INT8, 127.0),
    "fp8": (ir.DataType.FLOAT8E4M3FN, 448.0),
}


@dataclasses.dataclass
class CacheEntry:
    """One ``past → Concat → present`` chain."""

    past: ir.Value
    concat: ir.Node
    present: ir.Value

    @property
    def new(self) -> ir.Value:
        return self.concat.inputs[1]


def cache_entries(graph: ir.Graph) -> list[CacheEntry]:
    """The float cache chains: a float graph input ``[b, h, p, d > 1]`` read (besides ``Shape``)
    only by a two-input Concat along the sequence axis (2 of 4) as its first input, whose output
    is a graph output."""
    entries = []
    for value in graph.inputs:
        if value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        # Besides the Concat, only Shape may read the cache (the past length), whatever its type.
        readers = [(n, i) for n, i in value.uses() if n.op_type != "Shape"]
        if len(readers) != 1:
            continue
        node, index = readers[0]
        if node.op_type != "Concat" or node.domain != "" or index != 0 or len(node.inputs) != 2:
            continue
        shape = value.shape
        if shape is None or len(shape) != 4 or node.attributes.get_int("axis", 0) % 4 != 2:
            continue
        if shape[3] == 1:
            continue  # a scale chain of an 8-bit cache (head vectors are longer than 1)
        if node.outputs[0].is_graph_output():
            entries.append(CacheEntry(value, node, node.outputs[0]))
    return entries


def cache_bytes_per_token(graph: ir.Graph) -> int:
    """Bytes one token adds to the cache: the present outputs' last dimension × element size,
    summed over heads and outputs (scales included)."""
    total = 0
    for value in graph.outputs:
        if value.name is None or not value.name.startswith("present"):
            continue
        shape = value.shape
        heads, width = shape[1], shape[3]
        total += int(heads) * int(width) * int(value.dtype.itemsize)
    return total


class QuantizeKVCachePass(ir.passes.InPlacePass):
    """Store the KV cache of a decoder graph in 8 bits (``dtype``: ``int8`` or ``fp8``) with
    per-token, per-head float16 scales; see the module docstring."""

    def __init__(self, dtype: str = "int8") -> None:
        super().__init__()
        if dtype not in STORAGE:
            raise QCompileError(f"--kv-cache takes int8 or fp8, not {dtype!r}")
        self.dtype = dtype
        self.summary = ""

    def requires(self, model: ir.Model) -> None:
        done = model.metadata_props.get(METADATA_KEY)
        if cache_entries(model.graph):
            if done is not None:
                raise QCompileError(f"this graph's KV cache is partly {done} already; start from the float decoder")
            return
        if done is None:
            raise QCompileError(
                "--kv-cache needs a decoder graph with past key/values (float inputs past_key_values.* "
                "concatenated into present.* outputs); this graph has none: export one with "
                "`qcompile models export smollm2-decode`")
        if done != self.dtype:
            raise QCompileError(f"this graph's KV cache is already {done}; start from the float decoder for {self.dtype}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        entries = cache_entries(model.graph)
        for entry in entries:
            self._quantize(model.graph, entry)
        if entries:
            model.metadata_props[METADATA_KEY] = self.dtype
            if self.dtype == "fp8" and model.opset_imports.get("", 0) < 19:
                raise QCompileError("an fp8 KV cache needs opset ≥ 19 (Cast to float8)")
        self.summary = f"{len(entries)} cache tensors → {self.dtype}"
        return ir.passes.PassResult(model, modified=bool(entries))

    def _quantize(self, graph: ir.Graph, entry: CacheEntry) -> None:
        storage, qmax = STORAGE[self.dtype]
        float_type = entry.past.dtype
        b = ir_utils.NodeBuilder(graph, entry.concat, entry.present.name or "present")
        past, new = entry.past, entry.new
        # Interface: the past input becomes 8-bit, plus a float16 scale input per token.
        past_scale = ir.val(ir_utils.unique_name(graph, f"{past.name}{SCALE_SUFFIX}"), ir.DataType.FLOAT16,
                            _scale_shape(past.shape))
        graph.inputs.insert(graph.inputs.index(past) + 1, past_scale)
        past.type = ir.TensorType(storage)
        _reroute_shape_readers(graph, past, past_scale)
        # Quantize the new entries: one scale per (batch, head, token).
        amax = b.op("ReduceMax", [b.op("Abs", [new], "abs"), b.const("last_axis", np.array([-1], np.int64))],
                    "amax", keepdims=1)
        floor = b.const("scale_floor", SCALE_FLOOR.astype(_np(float_type)))
        scale = b.op("Max", [b.op("Div", [amax, b.const("qmax", np.array(qmax, _np(float_type)))], "ratio"), floor],
                     "scale_exact")
        new_scale16 = b.op("Cast", [scale], "scale_f16", to=int(ir.DataType.FLOAT16))
        new_scale = b.op("Cast", [new_scale16], "scale", to=int(float_type))
        new_q = self._to_storage(b, b.op("Div", [new, new_scale], "scaled"), storage, qmax)
        present_scale = b.op("Concat", [past_scale, new_scale16], "present_scale", axis=2)
        if storage == ir.DataType.INT8:
            present_q = b.op("Concat", [past, new_q], "present_q", axis=2)
            read = _dequantize(b, present_q, present_scale, float_type, "read")
        else:  # no float8 Concat: dequantize, concatenate, quantize again with the same scales
            read = b.op("Concat", [_dequantize(b, past, past_scale, float_type, "past_read"),
                                   _dequantize(b, new_q, new_scale16, float_type, "new_read")], "read", axis=2)
            scales = b.op("Cast", [present_scale], "present_scale_f", to=int(float_type))
            present_q = self._to_storage(b, b.op("Div", [read, scales], "rescaled"), storage, qmax)
        # Attention reads the dequantized cache; the graph outputs become the 8-bit cache + scales.
        present = entry.present
        read.type, read.shape = present.type, present.shape
        name = present.name
        position = list(graph.outputs).index(present)
        graph.outputs[position] = present_q
        graph.outputs.insert(position + 1, present_scale)
        present.replace_all_uses_with(read)
        graph.remove(entry.concat, safe=False)
        present.name = None
        present_q.name = name
        present_scale.name = f"{name}{SCALE_SUFFIX}"
        present_q.type, present_q.shape = ir.TensorType(storage), present.shape
        present_scale.type = ir.TensorType(ir.DataType.FLOAT16)
        present_scale.shape = _scale_shape(present.shape)

    @staticmethod
    def _to_storage(b: ir_utils.NodeBuilder, scaled: ir.Value, storage: ir.DataType, qmax: float) -> ir.Value:
        if storage == ir.DataType.INT8:
            dtype = np.float32 if scaled.dtype in (None, ir.DataType.FLOAT) else np.float16
            rounded = b.op("Clip", [b.op("Round", [scaled], "rounded"), b.const("qmin", np.array(-qmax, dtype)),
                                    b.const("qmax_clip", np.array(qmax, dtype))], "clipped")
            return b.op("Cast", [rounded], "q", to=int(storage))
        return b.op("Cast", [scaled], "q", to=int(storage), saturate=1)


def _np(dtype: ir.DataType):
    return np.float16 if dtype == ir.DataType.FLOAT16 else np.float32


def _scale_shape(shape: ir.Shape | None) -> ir.Shape | None:
    if shape is None:
        return None
    return ir.Shape([*list(shape)[:-1], 1])


def _dequantize(b: ir_utils.NodeBuilder, q: ir.Value, scale16: ir.Value, float_type: ir.DataType, suffix: str) -> ir.Value:
    """``s · q`` in the cache's float type."""
    as_float = b.op("Cast", [q], f"{suffix}_values", to=int(float_type))
    scale = b.op("Cast", [scale16], f"{suffix}_scale", to=int(float_type))
    return b.op("Mul", [as_float, scale], suffix)


def _reroute_shape_readers(graph: ir.Graph, past: ir.Value, past_scale: ir.Value) -> None:
    """``Shape`` readers of the cache (the exporter's past length): ONNX Runtime has no Shape
    kernel for float8, so a Shape not reaching the last axis reads the scale input (same
    ``[b, h, p]``); one that does reads a float16 Cast of the cache."""
    for node, index in list(past.uses()):
        if node.op_type != "Shape":
            continue
        end = node.attributes.get_int("end", 4)
        if end < 0 or end <= 3:  # the last axis (head_dim) is not read
            node.replace_input_with(index, past_scale)
        else:
            b = ir_utils.NodeBuilder(graph, node, past.name or "past")
            node.replace_input_with(index, b.op("Cast", [past], "for_shape", to=int(ir.DataType.FLOAT16)))
