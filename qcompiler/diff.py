"""What a compile changed: the structural difference between two ONNX models, by layer.

Nodes are matched in three ways, strongest first, so that a model rewritten by qcompile or by
another tool is still read layer by layer:

1. **Same node.** A node of B with the name of a node of A is the same node (``unchanged`` when
   op, domain, inputs, outputs and attributes agree, ``changed`` otherwise).
2. **Derived names.** A new node of B belongs to the node of A whose name, output value or
   initializer its own name, outputs or initializers extend (``node_MatMul_52.weight_q`` and
   ``val_53_quantized`` belong to ``node_MatMul_52`` and to the MatMul reading ``val_53``); the
   longest such prefix wins.
3. **Graph position.** Otherwise it belongs to the producer in A of the first input it reads
   that A also has (a QuantizeLinear moved onto ``matmul_1`` belongs to the node making it).

A *layer* is the module a node came from (the exporter's ``pkg.torch.onnx.name_scopes``
metadata, common prefix dropped), else the node's own name. Each float MatMul/Gemm/Conv with a
constant weight in A that is gone or changed in B is listed once in ``quantized``, with how B
computes it now (``qcompiler.inspect_model.QuantizedOp``) and the value where the two models can
be compared (``compare_at``: the first value downstream that both models produce, for the
numeric diff in ``qcompiler.layer_error``).
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx

from qcompiler import inspect_model as im

_SEPARATORS = "._/:-"
_COMPARE_DEPTH = 3  # nodes walked downstream of a weighted op to find a shared value


@dataclasses.dataclass(frozen=True)
class LayerChange:
    layer: str
    before: tuple[str, ...]  # op types of A's nodes that are gone or changed
    after: tuple[str, ...]  # op types of B's nodes that are new or changed
    removed_nodes: tuple[str, ...]
    added_nodes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    node: str  # A's weighted op
    layer: str
    op_type: str
    replaced_by: tuple[str, ...]  # B's op types in the same layer
    scheme: str  # how B computes it, or "float (changed)" when B has no quantized op there
    compare_at: str | None


@dataclasses.dataclass
class ModelDiff:
    a: str
    b: str
    layers: list[LayerChange]
    quantized: list[QuantizedLayer]
    unattributed: list[str]  # B's new nodes with no owner in A
    ops_a: dict[str, int]
    ops_b: dict[str, int]
    bytes_a: dict[str, int]
    bytes_b: dict[str, int]
    file_bytes: tuple[int, int]
    opsets: tuple[dict[str, int], dict[str, int]]
    io_changes: list[str]
    counts: dict[str, int]
    values_changed: list[str]  # initializers of both models with the same name, other values

    @property
    def unchanged(self) -> bool:
        return (not self.layers and not self.unattributed and self.ops_a == self.ops_b and not self.values_changed
                and self.bytes_a == self.bytes_b and self.opsets[0] == self.opsets[1] and not self.io_changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"unchanged": self.unchanged}


def _scopes(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
    return None


def layer_labels(model: onnx.ModelProto) -> dict[str, str]:
    """Node name → layer label (module path without the prefix all modules share)."""
    raw = {n.name: _scopes(n) for n in model.graph.node if n.name}
    paths = [p for p in raw.values() if p]
    prefix = os.path.commonprefix([p + "." for p in paths]) if len(paths) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    return {name: (path[len(prefix):] or path) if path else name for name, path in raw.items()}


def _signature(node: onnx.NodeProto) -> tuple:
    attrs = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
    return node.op_type, node.domain, tuple(node.input), tuple(node.output), attrs


def _extends(text: str, prefix: str) -> bool:
    return text == prefix or (text.startswith(prefix) and text[len(prefix)] in _SEPARATORS)


class _Owners:
    """Finds the node of A that a new node of B belongs to."""

    def __init__(self, a: onnx.ModelProto) -> None:
        self.keys: dict[str, str] = {}  # name prefix → A node name
        consts = im.initializers(a)
        graph_inputs = {v.name for v in a.graph.input}
        for node in a.graph.node:
            if not node.name:
                continue
            for out in node.output:
                self.keys.setdefault(out, node.name)
            for inp in node.input:
                if (inp in consts or inp in graph_inputs) and inp not in self.keys:
                    self.keys[inp] = node.name  # first reader of an initializer or graph input
        for node in a.graph.node:
            if node.name:
                self.keys[node.name] = node.name  # a node name beats a value name
        self.made_by = {out: n.name for n in a.graph.node for out in n.output if out and n.name}
        self.by_length = sorted(self.keys, key=len, reverse=True)

    def owner(self, node: onnx.NodeProto, b_consts: dict) -> str | None:
        names = [node.name, *node.output, *(i for i in node.input if i in b_consts)]
        best = None
        for text in filter(None, names):
            for key in self.by_length:
                if best is not None and len(key) <= len(best):
                    break
                if _extends(text, key):
                    best = key
                    break
        if best is not None:
            return self.keys[best]
        return next((self.made_by[i] for i in node.input if i in self.made_by), None)


def diff_models(path_a: str | Path, path_b: str | Path) -> ModelDiff:
    """The structural difference from model A (usually float) to model B (compiled)."""
    a, b = im.load_graph_only(path_a), im.load_graph_only(path_b)
    labels_a, labels_b = layer_labels(a), layer_labels(b)
    nodes_a = {n.name: n for n in a.graph.node if n.name}
    nodes_b = {n.name: n for n in b.graph.node if n.name}
    owners, b_consts = _Owners(a), im.initializers(b)

    removed: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    added: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    counts = collections.Counter()
    for name, node in nodes_a.items():
        other = nodes_b.get(name)
        if other is not None and _signature(other) == _signature(node):
            counts["unchanged"] += 1
            continue
        counts["changed" if other is not None else "removed"] += 1
        removed[labels_a[name]].append(node)
    unattributed = []
    for node in b.graph.node:
        if node.name in nodes_a:
            if _signature(node) != _signature(nodes_a[node.name]):
                added[labels_a[node.name]].append(node)
            continue
        counts["added"] += 1
        owner = owners.owner(node, b_consts)
        label = labels_a[owner] if owner is not None else labels_b.get(node.name)
        if owner is None and (label is None or label == node.name):
            unattributed.append(node.name or node.output[0])
        else:
            added[label].append(node)

    order = {label: i for i, label in enumerate(dict.fromkeys(labels_a[n.name] for n in a.graph.node if n.name))}
    layers = [
        LayerChange(label, tuple(n.op_type for n in removed.get(label, ())), tuple(n.op_type for n in added.get(label, ())),
                    tuple(n.name for n in removed.get(label, ())), tuple(n.name or n.output[0] for n in added.get(label, ())))
        for label in sorted(set(removed) | set(added), key=lambda l: (order.get(l, len(order)), l))
    ]
    return ModelDiff(
        a=str(path_a), b=str(path_b), layers=layers,
        quantized=_quantized_layers(a, b, labels_a, added, nodes_b),
        unattributed=unattributed,
        ops_a=im.op_histogram(a), ops_b=im.op_histogram(b),
        bytes_a=im.bytes_by_dtype(a), bytes_b=im.bytes_by_dtype(b),
        file_bytes=(_file_bytes(Path(path_a)), _file_bytes(Path(path_b))),
        opsets=({d.domain or "ai.onnx": d.version for d in a.opset_import},
                {d.domain or "ai.onnx": d.version for d in b.opset_import}),
        io_changes=_io_changes(a, b),
        counts=dict(counts),
        values_changed=_values_changed(im.initializers(a), b_consts),
    )


def _quantized_layers(a, b, labels_a, added, nodes_b) -> list[QuantizedLayer]:
    """One row per float weighted op of A that B no longer runs as it was."""
    b_quant = {q.node: q for q in im.quantized_ops(b)}
    produced_b = {out for n in b.graph.node for out in n.output} | {i.name for i in b.graph.input}
    consumers_a = collections.defaultdict(list)
    for n in a.graph.node:
        for i in n.input:
            consumers_a[i].append(n)
    rows = []
    for node in im.weighted_ops(a):
        same = nodes_b.get(node.name)
        if same is not None and _signature(same) == _signature(node):
            continue
        label = labels_a.get(node.name, node.name)
        new_nodes = added.get(label, [])
        schemes = [b_quant[n.name or n.output[0]].describe() for n in new_nodes if (n.name or n.output[0]) in b_quant]
        if same is not None and same.name in b_quant:
            schemes.insert(0, b_quant[same.name].describe())
        rows.append(QuantizedLayer(
            node=node.name, layer=label, op_type=node.op_type,
            replaced_by=tuple(n.op_type for n in new_nodes),
            scheme=schemes[0] if schemes else "float (changed)",
            compare_at=_compare_point(node, consumers_a, produced_b, a),
        ))
    return rows


def _compare_point(node, consumers_a, produced_b, a) -> str | None:
    """The first value at or after ``node``'s output that B produces too (single-reader path)."""
    outputs = {o.name for o in a.graph.output}
    value = node.output[0]
    for _ in range(_COMPARE_DEPTH):
        if value in produced_b:
            return value
        readers = consumers_a.get(value, [])
        if len(readers) != 1 or value in outputs:
            return None
        value = readers[0].output[0]
    return value if value in produced_b else None


def _values_changed(consts_a: dict, consts_b: dict) -> list[str]:
    """Names of the initializers both models hold whose type, shape or bytes differ (tensors
    stored outside the file compare by where they are stored)."""
    return [name for name, t in consts_a.items() if name in consts_b
            and t.SerializeToString(deterministic=True) != consts_b[name].SerializeToString(deterministic=True)]


def _io_changes(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    changes = []
    for kind, xs, ys in (("input", a.graph.input, b.graph.input), ("output", a.graph.output, b.graph.output)):
        ta = {v.name: _type_text(v) for v in xs}
        tb = {v.name: _type_text(v) for v in ys}
        changes += [f"{kind} {n} removed" for n in ta if n not in tb]
        changes += [f"{kind} {n} added: {tb[n]}" for n in tb if n not in ta]
        changes += [f"{kind} {n}: {ta[n]} → {tb[n]}" for n in ta if n in tb and ta[n] != tb[n]]
    return changes


def _type_text(v: onnx.ValueInfoProto) -> str:
    t = v.type.tensor_type
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.shape.dim]
    return f"{im.dtype_name(t.elem_type)}[{','.join(dims)}]"


def _file_bytes(path: Path) -> int:
    from qcompiler.pipeline import model_file_bytes

    return model_file_bytes(path)


def format_diff(d: ModelDiff) -> list[str]:
    """The text report."""
    if d.unchanged:
        return [f"{d.a} → {d.b}: no change ({sum(d.ops_a.values())} nodes, same weights, opsets and I/O)"]
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    lines = [f"{d.a} → {d.b}",
             f"size: {mb(d.file_bytes[0])} → {mb(d.file_bytes[1])}; nodes: {sum(d.ops_a.values())} → "
             f"{sum(d.ops_b.values())} ({', '.join(f'{k} {v}' for k, v in sorted(d.counts.items()))})"]
    if d.opsets[0] != d.opsets[1]:
        lines.append(f"opsets: {_dict_text(d.opsets[0])} → {_dict_text(d.opsets[1])}")
    lines += [f"I/O: {c}" for c in d.io_changes]
    lines.append("weights by dtype: " + _dict_text({k: mb(v) for k, v in d.bytes_a.items()})
                 + " → " + _dict_text({k: mb(v) for k, v in d.bytes_b.items()}))
    if d.values_changed:
        lines.append(f"initializers with new values ({len(d.values_changed)}): " + ", ".join(d.values_changed[:8])
                     + (" …" if len(d.values_changed) > 8 else ""))
    ops = sorted(set(d.ops_a) | set(d.ops_b))
    moved = [f"{op} {d.ops_a.get(op, 0)}→{d.ops_b.get(op, 0)}" for op in ops if d.ops_a.get(op, 0) != d.ops_b.get(op, 0)]
    lines.append("op counts: " + ", ".join(moved))
    if d.quantized:
        lines.append(f"quantized layers ({len(d.quantized)}):")
        width = max(len(q.layer) for q in d.quantized)
        for q in d.quantized:
            lines.append(f"  {q.layer:<{width}}  {q.op_type} → {q.scheme}")
    lines.append(f"changes by layer ({len(d.layers)}):")
    for change in d.layers:
        lines.append(f"  {change.layer}: {_ops_text(change.before) or '—'} → {_ops_text(change.after) or '—'}")
    if d.unattributed:
        lines.append(f"new nodes with no source in A ({len(d.unattributed)}): " + ", ".join(d.unattributed[:10])
                     + (" …" if len(d.unattributed) > 10 else ""))
    return lines


def _ops_text(ops: tuple[str, ...]) -> str:
    counts = collections.Counter(ops)
    return ", ".join(f"{op}×{n}" if n > 1 else op for op, n in counts.items())


def _dict_text(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


# --- numeric ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerError:
    """``sqnr_db``/``cosine``/``max_abs``: B against A at ``compare_at`` (error accumulated
    from the input on). ``local_sqnr_db``: B's layer against A's float layer fed *B's* input
    there, the error this layer adds itself (None where A's layer cannot be fed from B)."""

    node: str
    layer: str
    compare_at: str
    sqnr_db: float
    cosine: float
    max_abs: float
    local_sqnr_db: float | None = None


def numeric_diff(d: ModelDiff, feeds, threads: int | None = None, inputs: dict[str, np.ndarray] | None = None
                 ) -> tuple[list[LayerError], dict[str, dict]]:
    """Per quantized layer, the error of B's value against A's at ``compare_at`` and the error
    the layer adds itself; worst own error first (accumulated where that is unknown); and the
    error at each graph output. ``inputs`` (a dict to fill, in the same run): node → sampled
    values of the activation entering it in A."""
    from qcompiler import layer_error

    points = [q.compare_at for q in d.quantized if q.compare_at]
    a_full, b_full = onnx.load(d.a), onnx.load(d.b)
    probes = add_float_probes(b_full, a_full, d.quantized)
    entering = {n.name: n.input[0] for n in a_full.graph.node if n.name in {q.node for q in d.quantized}}
    samples: dict[str, list] | None = {v: [] for v in entering.values()} if inputs is not None else None
    stats, local = layer_error.compare(
        a_full, b_full, points, feeds, threads, pairs={q: (q, p) for q, p in probes.items()}, samples=samples)
    if inputs is not None:
        inputs.update({node: np.concatenate(samples[v]) for node, v in entering.items() if samples[v]})
    rows = [LayerError(q.node, q.layer, q.compare_at, s.sqnr_db, s.cosine, s.max_abs,
                       local[q.compare_at].sqnr_db if q.compare_at in local else None)
            for q in d.quantized if q.compare_at and (s := stats.get(q.compare_at)) is not None]
    rows.sort(key=lambda r: (r.local_sqnr_db if r.local_sqnr_db is not None else r.sqnr_db, r.sqnr_db))
    outputs = {o.name: stats[o.name].as_dict() for o in a_full.graph.output if o.name in stats}
    return rows, outputs


def add_float_probes(b: onnx.ModelProto, a: onnx.ModelProto, quantized: list[QuantizedLayer]) -> dict[str, str]:
    """Copy into B, for each quantized layer, A's float nodes from the weighted op to
    ``compare_at``, reading B's values where the layer's inputs are activations and A's
    constants (renamed) for its weights. Returns compare_at → the copy's output. A layer whose
    activation inputs B does not produce is left out."""
    consts_a, made_by_a = im.initializers(a), im.producers(a)
    available = {out for n in b.graph.node for out in n.output} | {i.name for i in b.graph.input}
    nodes_a = {n.name: n for n in a.graph.node if n.name}
    consumers = collections.defaultdict(list)
    for n in a.graph.node:
        for i in n.input:
            consumers[i].append(n)
    copied_consts: set[str] = set()
    probes, new_nodes = {}, []
    for q in quantized:
        start = nodes_a.get(q.node)
        if start is None or q.compare_at is None:
            continue
        chain = _chain(start, q.compare_at, consumers)
        if chain is None:
            continue
        nodes = _constant_producers(chain, consts_a, made_by_a) + chain
        internal = {out for n in nodes for out in n.output}
        needed = {i for n in nodes for i in n.input if i and i not in internal and i not in consts_a}
        views = _views_back_to(needed - available, available, consts_a, made_by_a)
        if views is None:
            continue
        nodes = views + nodes
        internal = {out for n in nodes for out in n.output}
        rename = {v: f"{v}::float_probe" for v in internal} | {c: f"{c}::float_probe" for n in nodes for c in n.input if c in consts_a}
        for n in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = f"{n.name}::float_probe"
            copy.input[:] = [rename.get(i, i) for i in n.input]
            copy.output[:] = [rename.get(o, o) for o in n.output]
            new_nodes.append(copy)
        for c in {c for n in nodes for c in n.input if c in consts_a} - copied_consts:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(consts_a[c])
            tensor.name = rename[c]
            b.graph.initializer.append(tensor)
            copied_consts.add(c)
        probes[q.compare_at] = rename[q.compare_at]
    b.graph.node.extend(new_nodes)  # B's values they read are made earlier: ORT sorts the graph
    return probes


def _chain(start: onnx.NodeProto, end: str, consumers) -> list[onnx.NodeProto] | None:
    chain, node = [start], start
    while end not in node.output:
        readers = consumers.get(node.output[0], [])
        if len(readers) != 1 or len(chain) > _COMPARE_DEPTH:
            return None
        node = readers[0]
        chain.append(node)
    return chain


def _views_back_to(missing: set[str], available: set[str], consts, made_by) -> list[onnx.NodeProto] | None:
    """A's view ops (Reshape, Transpose…) that recompute ``missing`` values from values B has
    (a Q/DQ moved across a reshape renames the reshape's output in B), in order; None if some
    value cannot be recomputed so."""
    found: list[onnx.NodeProto] = []
    for value in sorted(missing):
        path, name = [], value
        while name not in available:
            node = made_by.get(name)
            if node is None or node.op_type not in im.VIEW_OPS or len(path) > 4:
                return None
            if any(i and i not in available and i not in consts for i in node.input[1:]):
                return None
            path.append(node)
            name = node.input[0]
        found += [n for n in reversed(path) if n not in found]
    return found


def _constant_producers(chain, consts, made_by) -> list[onnx.NodeProto]:
    """View nodes in A that turn a constant into a weight the chain reads (a tied transpose)."""
    found = []
    for n in chain:
        for i in n.input:
            source, views = im._through_views(i, made_by)
            if views and source in consts:
                found += [v for v in reversed(views) if v not in found]
    return found


def format_numeric(rows: list[LayerError], outputs: dict[str, dict], top: int | None = None) -> list[str]:
    lines = ["graph outputs: " + "; ".join(
        f"{name} SQNR {o['sqnr_db']:.1f} dB, cosine {o['cosine']:.5f}, max |err| {o['max_abs']:.4g}"
        for name, o in outputs.items())]
    shown = rows[:top] if top else rows
    if not shown:
        return lines + ["no quantized layer has a value both models produce"]
    width = max(len(r.layer) for r in shown)
    lines.append(f"per-layer error at each quantized layer's output, worst own error first ({len(shown)} of {len(rows)}):")
    lines.append(f"  {'layer':<{width}}  {'own SQNR':>8}  {'SQNR dB':>8}  {'cosine':>8}  {'max |err|':>10}  value")
    lines += [f"  {r.layer:<{width}}  {_db(r.local_sqnr_db):>8}  {r.sqnr_db:8.2f}  {r.cosine:8.5f}  {r.max_abs:10.4g}  "
              f"{r.compare_at}" for r in shown]
    lines.append("  (own SQNR: the layer against float fed the same input, the error it adds; SQNR: accumulated)")
    return lines


def _db(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
