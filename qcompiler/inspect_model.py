"""What a model is made of: ops, bytes by dtype, which ops are quantized and how, provenance.

Read from the ONNX protobuf without loading external weight data (sizes come from the declared
dims), so a model of any size is inspected in memory proportional to its graph. Used by
``qcompile inspect`` and by ``qcompile diff`` (``qcompiler.diff``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import QCompileError

WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")
VIEW_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast")
# Integer ops: index of the weight input; its scale follows it for the QLinear ops.
_INTEGER_OPS = {"MatMulIntegerToFloat": 1, "MatMulInteger": 1, "ConvInteger": 1, "QLinearMatMul": 3,
                "QLinearConv": 3, "DynamicQuantizeMatMul": 1}


def load_graph_only(path: str | Path) -> onnx.ModelProto:
    """The model's protobuf without external data; a QCompileError if it is not an ONNX model."""
    path = Path(path)
    if path.is_dir():
        raise QCompileError(f"{path} is a folder: give a .onnx model file")
    if not path.is_file():
        raise QCompileError(f"no such model file: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise QCompileError(f"{path} is not an ONNX model ({type(exc).__name__}); give a .onnx file") from exc


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes the tensor's values take (declared dims × element size; 4-bit types count ½)."""
    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 0


def dtype_name(data_type: int) -> str:
    return onnx.TensorProto.DataType.Name(data_type).lower()


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors of the main graph, by value name."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = attr.t
    return found


def bytes_by_dtype(model: onnx.ModelProto) -> dict[str, int]:
    totals: collections.Counter = collections.Counter()
    for t in initializers(model).values():
        totals[dtype_name(t.data_type)] += tensor_bytes(t)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output if out}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _through_views(name: str, made_by: dict[str, onnx.NodeProto]) -> tuple[str, list[onnx.NodeProto]]:
    """Follow ``name`` up through view ops; the source value and the view nodes passed."""
    passed = []
    node = made_by.get(name)
    while node is not None and node.op_type in VIEW_OPS and node.input:
        passed.append(node)
        name = node.input[0]
        node = made_by.get(name)
    return name, passed


def constant_weight(node: onnx.NodeProto, consts: dict, made_by: dict) -> str | None:
    """Name of the constant a MatMul/Gemm/Conv multiplies by (through views), or None."""
    for index in (1, 0) if node.op_type in ("MatMul", "Gemm") else (1,):
        if index < len(node.input):
            source, _ = _through_views(node.input[index], made_by)
            if source in consts:
                return source
    return None


@dataclasses.dataclass(frozen=True)
class QuantizedOp:
    """One quantized compute op: ``scheme`` says weights and activations in words."""

    node: str
    op_type: str
    weight_dtype: str
    bits: int
    granularity: str  # per-tensor | per-channel | group N
    activations: str  # float | static | dynamic | int8 per block

    def describe(self) -> str:
        return (f"{self.op_type}: {self.weight_dtype} weights ({self.bits}-bit, {self.granularity}), "
                f"{self.activations} activations")


def _granularity(scale: onnx.TensorProto | None, block_size: int | None = None) -> str:
    if block_size:
        return f"group {block_size}"
    if scale is None:
        return "run-time"
    return "per-tensor" if int(np.prod(scale.dims, dtype=np.int64)) <= 1 else "per-channel"


def _bits(data_type: int) -> int:
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 4
    if dtype_name(data_type) in ("int2", "uint2"):
        return 2
    return 8 * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _activation(name: str, consts: dict, made_by: dict) -> str:
    """How the activation ``name`` reaching a quantized op was quantized: ``static`` (constant
    scale), ``dynamic`` (one run-time scale per tensor), ``per-token`` (run-time scales per row)
    or ``float``. Looks through one DequantizeLinear and view ops."""
    source, _ = _through_views(name, made_by)
    node = made_by.get(source)
    if node is not None and node.op_type == "DequantizeLinear":
        node = made_by.get(_through_views(node.input[0], made_by)[0])
    if node is None:
        return "float"
    if node.op_type == "DynamicQuantizeLinear":
        return "dynamic"
    if node.op_type == "QuantizeLinear":
        scaled_first = made_by.get(node.input[0])  # x / s_row, then a unit-scale Q
        if node.input[1] not in consts or (
                scaled_first is not None and scaled_first.op_type == "Div" and scaled_first.input[1] not in consts):
            return "per-token"
        return "static"
    return "float"


def quantized_ops(model: onnx.ModelProto) -> list[QuantizedOp]:
    """Every compute op that reads quantized weights, in graph order."""
    consts, made_by = initializers(model), producers(model)
    found = []
    for node in model.graph.node:
        op = _describe(node, consts, made_by)
        if op is not None:
            found.append(op)
    return found


def _describe(node: onnx.NodeProto, consts: dict, made_by: dict) -> QuantizedOp | None:
    name = node.name or node.output[0]
    if node.op_type in _INTEGER_OPS and len(node.input) > _INTEGER_OPS[node.op_type]:
        w_index = _INTEGER_OPS[node.op_type]
        weight = consts.get(_through_views(node.input[w_index], made_by)[0])
        if weight is None:
            return None
        scale = consts.get(node.input[w_index + 1]) if node.op_type.startswith("QLinear") else (
            consts.get(node.input[3]) if node.op_type == "MatMulIntegerToFloat" and len(node.input) > 3 else None)
        act = _activation(node.input[0], consts, made_by)
        return QuantizedOp(name, node.op_type, dtype_name(weight.data_type), _bits(weight.data_type),
                           _granularity(scale), act)
    if node.op_type == "MatMulNBits":
        level = _attr(node, "accuracy_level", 0)
        act = "int8 per block" if level == 4 else "float"
        return QuantizedOp(name, node.op_type, f"uint{_attr(node, 'bits', 4)}", int(_attr(node, "bits", 4)),
                           f"group {_attr(node, 'block_size', 0)}", act)
    if node.op_type in WEIGHTED_OPS:
        for index, source in enumerate(node.input[:2]):
            dq = made_by.get(_through_views(source, made_by)[0])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in consts:
                continue
            weight = consts[dq.input[0]]
            scale = consts.get(dq.input[1]) if len(dq.input) > 1 else None
            act = _activation(node.input[0 if node.op_type == "Conv" else 1 - index], consts, made_by)
            return QuantizedOp(name, node.op_type, dtype_name(weight.data_type), _bits(weight.data_type),
                               _granularity(scale, _attr(dq, "block_size")), act)
    if node.domain not in ("", "ai.onnx", "com.microsoft") and node.op_type.endswith("MatMul"):
        weight = next((consts[i] for i in node.input[1:] if i in consts), None)
        if weight is not None:
            group = _attr(node, "group_size") or _attr(node, "block_size")
            return QuantizedOp(name, f"{node.domain}.{node.op_type}", dtype_name(weight.data_type),
                               int(_attr(node, "bits", _bits(weight.data_type))), _granularity(None, group),
                               "float" if "Int4" in node.op_type else "int8 per row")
    return None


def weighted_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Float MatMul/Gemm/Conv nodes that multiply by a constant (not through a DequantizeLinear)."""
    consts, made_by = initializers(model), producers(model)
    return [n for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.domain in ("", "ai.onnx")
            and constant_weight(n, consts, made_by) is not None]


def provenance(model: onnx.ModelProto) -> dict[str, object]:
    """The ``qcompile.*`` metadata a compile stamped (JSON values decoded)."""
    found: dict[str, object] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith("qcompile."):
            continue
        try:
            found[prop.key] = json.loads(prop.value)
        except ValueError:
            found[prop.key] = prop.value
    return found


def summary(path: str | Path) -> dict:
    """Everything ``qcompile inspect`` shows, as plain data."""
    model = load_graph_only(path)
    quantized = quantized_ops(model)
    schemes = collections.Counter(
        (q.op_type, q.weight_dtype, q.granularity, q.activations) for q in quantized)
    return {
        "model": str(path),
        "opsets": {d.domain or "ai.onnx": d.version for d in model.opset_import},
        "nodes": len(model.graph.node),
        "ops": op_histogram(model),
        "initializer_bytes": bytes_by_dtype(model),
        "quantized": [dataclasses.asdict(q) for q in quantized],
        "quantized_schemes": [
            {"op_type": k[0], "weight_dtype": k[1], "granularity": k[2], "activations": k[3], "count": n}
            for k, n in schemes.most_common()],
        "float_weighted_ops": [n.name or n.output[0] for n in weighted_ops(model)],
        "provenance": provenance(model),
    }


def format_summary(info: dict, verbose: bool = False) -> list[str]:
    """``summary`` as text lines."""
    total = sum(info["initializer_bytes"].values())
    lines = [f"{info['model']}: {info['nodes']} nodes, weights {total / 1e6:.1f} MB, opsets "
             + ", ".join(f"{d} {v}" for d, v in info["opsets"].items())]
    lines.append("bytes by dtype: " + ", ".join(
        f"{d} {b / 1e6:.2f} MB" for d, b in info["initializer_bytes"].items()))
    lines.append("ops: " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()))
    lines.append(f"quantized ops: {len(info['quantized'])}; float weighted ops: {len(info['float_weighted_ops'])}")
    for s in info["quantized_schemes"]:
        lines.append(f"  {s['count']:5d} × {s['op_type']}: {s['weight_dtype']} weights, {s['granularity']}, "
                     f"{s['activations']} activations")
    if verbose:
        lines += [f"    {q['node']}: {q['op_type']} {q['weight_dtype']} {q['granularity']}" for q in info["quantized"]]
        lines += [f"    float: {name}" for name in info["float_weighted_ops"]]
    prov = info["provenance"]
    if not prov:
        lines.append("provenance: none (not written by qcompile)")
        return lines
    lines.append(f"provenance: qcompile {prov.get('qcompile.version', '?')}, recipe {prov.get('qcompile.recipe', '?')}")
    flags = prov.get("qcompile.flags")
    if isinstance(flags, dict):
        lines.append("  flags: " + ", ".join(f"{k}={_short(v)}" for k, v in flags.items()))
    if "qcompile.calibration_digest" in prov:
        lines.append(f"  calibration data sha256 {str(prov['qcompile.calibration_digest'])[:16]}…")
    passes = prov.get("qcompile.passes")
    if isinstance(passes, list):
        for p in passes:
            added = ", ".join(f"+{n} {op}" for op, n in p.get("added", {}).items())
            removed = ", ".join(f"-{n} {op}" for op, n in p.get("removed", {}).items())
            lines.append(f"  {p.get('pass', '?'):<28} {'; '.join(x for x in (added, removed) if x) or 'no node changes'}")
    for key in sorted(k for k in prov if k not in (
            "qcompile.version", "qcompile.recipe", "qcompile.flags", "qcompile.passes", "qcompile.calibration_digest")):
        lines.append(f"  {key}: {_short(prov[key], 100)}")
    return lines


def _short(value, width: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"
