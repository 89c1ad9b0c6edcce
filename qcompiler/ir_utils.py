"""onnx_ir helpers: loading with clear errors, atomic saving, constants seen through views."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCompileError, first_line

# Weights above this total size go to an external data file beside the model (protobuf's
# limit is 2 GiB; we keep a margin for the graph itself).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Ops that only move or relabel elements: a constant seen through them is still a constant.
VIEW_OPS = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")
MIN_OPSET = 13  # per-axis DequantizeLinear


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (external data included, lazily) or raise a one-line error."""
    path = Path(path)
    if not path.exists():
        raise QCompileError(f"model file not found: {path}")
    if path.is_dir():
        raise QCompileError(f"expected an .onnx file, got a folder: {path}")
    if path.stat().st_size == 0:
        raise QCompileError(f"model file is empty: {path}")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several types for corrupt files
        raise QCompileError(f"cannot read {path} as an ONNX model ({first_line(exc)})") from exc
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise QCompileError(
            f"{path} uses opset {opset}; qcompile needs opset ≥ {MIN_OPSET} "
            "(convert it with onnx.version_converter.convert_version)"
        )
    return model


def save_model(
    model: ir.Model, path: str | os.PathLike, external_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> Path:
    """Write ``model`` atomically: into a temporary folder beside ``path``, then rename.

    Weights go to ``<name>.data`` when they exceed ``external_threshold`` bytes. A reader
    never sees a half-written file, and an interrupted save leaves nothing behind.
    """
    path = Path(path)
    if not path.parent.exists():
        raise QCompileError(f"output folder does not exist: {path.parent}")
    external = initializer_bytes(model) > external_threshold
    with tempfile.TemporaryDirectory(prefix=".qcompile-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        data_name = path.name + ".data"
        ir.save(model, staged, external_data=data_name if external else None)
        if external:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(staged, path)
    return path


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array if it is an initializer or the output of a Constant node."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        tensor = ir.convenience.get_const_tensor(value)
        return None if tensor is None else tensor.numpy()
    return None


def constant_through_views(value: ir.Value | None) -> np.ndarray | None:
    """The array a value holds when it is a constant seen through view ops only.

    Follows ``Transpose``/``Reshape``/``Identity``/``(Un)Squeeze``/``Flatten`` back to an
    initializer and applies them in numpy, e.g. a language model's LM head ``MatMul(h,
    Transpose(embedding))``. Returns None when anything on the way is not constant.
    """
    direct = constant_array(value)
    if direct is not None or value is None:
        return direct
    node = value.producer()
    if node is None or node.domain != "" or node.op_type not in VIEW_OPS:
        return None
    source = constant_through_views(node.inputs[0])
    if source is None:
        return None
    return _apply_view(node, source)


def _apply_view(node: ir.Node, x: np.ndarray) -> np.ndarray | None:
    attrs = node.attributes
    if node.op_type == "Identity":
        return x
    if node.op_type == "Transpose":
        perm = attrs["perm"].as_ints() if "perm" in attrs else None
        return np.transpose(x, perm)
    if node.op_type == "Flatten":
        axis = attrs["axis"].as_int() if "axis" in attrs else 1
        axis %= max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    second = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op_type == "Reshape":
        if second is None:
            return None
        shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(second.tolist())]
        return x.reshape(shape)
    axes = second.tolist() if second is not None else (
        attrs["axes"].as_ints() if "axes" in attrs else None
    )
    if node.op_type == "Squeeze":
        return np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
    if node.op_type == "Unsqueeze" and axes is not None:
        return np.expand_dims(x, tuple(axes))
    return None


class NodeBuilder:
    """Inserts new nodes, in creation order, just before ``before`` and names each node and
    value ``<stem>.<suffix>`` (made unique). The passes build all their subgraphs with it."""

    def __init__(self, graph: ir.Graph, before: ir.Node, stem: str) -> None:
        self.graph, self.before, self.stem = graph, before, stem
        self.created: list[ir.Node] = []

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        return initializer(self.graph, f"{self.stem}.{suffix}", np.asarray(array))

    def op(self, op_type: str, inputs: list, suffix: str, num_outputs: int = 1,
           domain: str = "", **attrs):
        """Add one node; returns its output (or outputs when ``num_outputs > 1``)."""
        node = ir.node(
            op_type,
            inputs,
            attributes=attrs or None,
            domain=domain,
            num_outputs=num_outputs,
            name=unique_name(self.graph, f"{self.stem}.{suffix}", kind="node"),
        )
        self.created.append(node)
        for i, out in enumerate(node.outputs):
            out.name = unique_name(self.graph, f"{self.stem}.{suffix}" + (f"_{i}" if i else ""))
        self.graph.insert_before(self.before, node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer with a name not yet used in ``graph``."""
    value = ir.val(unique_name(graph, name), const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, stem: str, kind: str = "value") -> str:
    """``stem``, or ``stem_1``, ``stem_2``… if a value (``kind="node"``: a node) of the graph
    already has that name. Values and nodes are separate namespaces, as in ONNX."""
    key = f"qcompile.names.{kind}"
    taken = graph.meta.get(key)
    if taken is None:
        if kind == "node":
            taken = {n.name for n in ir.traversal.RecursiveGraphIterator(graph) if n.name}
        else:
            taken = {v.name for v in _all_values(graph) if v.name}
        graph.meta[key] = taken
    name, i = stem, 0
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    taken.add(name)
    return name


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


@contextlib.contextmanager
def extra_outputs(model: ir.Model, values: list[ir.Value]) -> Iterator[None]:
    """Temporarily expose ``values`` as graph outputs (for calibration runs)."""
    graph = model.graph
    added = [v for v in values if not v.is_graph_output()]
    missing_type = [v for v in added if v.type is None]
    for v in missing_type:
        v.type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.extend(added)
    try:
        yield
    finally:
        for v in added:
            graph.outputs.remove(v)
        for v in missing_type:
            v.type = None


def replace_output(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name."""
    new.shape, new.type = old.shape, old.type
    was_output = old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        name = old.name
        old.name = None
        new.name = name
