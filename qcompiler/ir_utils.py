"""onnx_ir helpers: loading with clear errors, atomic saving, constants seen through views."""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.errors import QCompileError, first_line

# Weights above this total size go to an external data file beside the model (protobuf's
# limit is 2 GiB; we keep a margin for the graph itself).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Ops that only move or relabel elements: a constant seen through them is still a constant.
VIEW_OPS = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")
MIN_OPSET = 13  # per-axis DequantizeLinear
MAX_OPSET = 26  # the newest opset ONNX Runtime 1.31 loads
# graph.meta: the input's memory-mapped (external data) tensors, see release_mapped_pages.
MAPPED_KEY = "qcompile.mapped_tensors"


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (external data included, lazily) or raise a one-line error.

    The file must parse, pass ``onnx.checker`` (a graph that is merely not topologically
    sorted is accepted: the pipeline sorts it; cycles and inputs nothing defines are not), use
    an opset in ``[MIN_OPSET, MAX_OPSET]`` and have graph outputs; every external data file it
    names must exist and hold the bytes it claims.
    """
    path = Path(path)
    if not path.exists():
        raise QCompileError(f"model file not found: {path}")
    if path.is_dir():
        raise QCompileError(f"expected an .onnx file, got a folder: {path}")
    if path.stat().st_size == 0:
        raise QCompileError(f"model file is empty: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several types for corrupt files
        raise QCompileError(f"cannot read {path} as an ONNX model ({first_line(exc)})") from exc
    _check_proto(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise QCompileError(f"cannot read {path} as an ONNX model ({first_line(exc)})") from exc
    ir.external_data.set_base_dir(model.graph, path.parent)
    _check_external_data(model, path)
    mapped = [v.const_value for v in model.graph.initializers.values()
              if isinstance(v.const_value, ir.ExternalTensor)]
    if mapped:
        model.graph.meta[MAPPED_KEY] = mapped
    return model


def release_array_pages(array: np.ndarray) -> None:
    """Drop the resident pages under ``array`` when it is a view of a read-only memory map
    (an external-data weight: ``ExternalTensor.numpy()``); anything else is left alone. Passes
    that read every weight once call it after each, so that only one float weight at a time is
    resident."""
    raw = array
    while isinstance(raw, (np.ndarray, memoryview)):
        raw = raw.base if isinstance(raw, np.ndarray) else raw.obj
    if not isinstance(raw, mmap.mmap) or raw.closed or len(raw) == 0 or array.size == 0:
        return
    start_address = np.frombuffer(raw, np.uint8, count=1).__array_interface__["data"][0]
    low, high = np.lib.array_utils.byte_bounds(array)
    start = (low - start_address) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(high - start_address, len(raw))
    if 0 <= start < end:
        raw.madvise(mmap.MADV_DONTNEED, start, end - start)


def release_mapped_pages(model: ir.Model) -> None:
    """Drop the resident pages of the input's memory-mapped weights (file-backed, read-only:
    the data stays valid and is read back from the page cache if touched again). Called
    between passes, so that a pass that reads every weight once does not leave the whole
    float model in the process's memory for the rest of the compile."""
    for tensor in model.graph.meta.get(MAPPED_KEY, ()):
        raw = getattr(tensor, "raw", None)
        if raw is None or raw.closed:
            continue
        start = (tensor.offset or 0) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min((tensor.offset or 0) + tensor.nbytes, len(raw))
        if end > start:
            raw.madvise(mmap.MADV_DONTNEED, start, end - start)


def _check_proto(proto: onnx.ModelProto, path: Path) -> None:
    """Opset range, the ONNX checker and graph outputs (see ``load_model``)."""
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    if "" not in opsets and "ai.onnx" not in opsets:
        raise QCompileError(f"{path} imports no standard ONNX opset; it is not a usable ONNX model")
    opset = opsets.get("", opsets.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        raise QCompileError(
            f"{path} uses opset {opset}; qcompile needs opset ≥ {MIN_OPSET} "
            "(convert it with onnx.version_converter.convert_version)"
        )
    if opset > MAX_OPSET:
        raise QCompileError(
            f"{path} uses opset {opset}, newer than ONNX Runtime runs (≤ {MAX_OPSET}); "
            f"convert it to opset {MAX_OPSET} with onnx.version_converter.convert_version"
        )
    try:
        # By path: external data files are resolved beside the model (the proto in memory
        # holds only their names).
        onnx.checker.check_model(os.fspath(path))
    except Exception as exc:  # ValidationError, or the C++ side's other types on odd protos
        message = first_line(exc)
        if "topologically sorted" not in message:
            raise QCompileError(f"{path} is not a valid ONNX model: {message} (fix or re-export it)") from exc
        _check_dataflow(proto.graph, path)  # raises on a cycle or an undefined input
        _sort_nodes(proto.graph)
        if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            try:  # the rest of the checks, on the sorted graph
                onnx.checker.check_model(proto)
            except Exception as exc2:
                raise QCompileError(
                    f"{path} is not a valid ONNX model: {first_line(exc2)} (fix or re-export it)") from exc2
    if not proto.graph.output:
        raise QCompileError(f"{path} has no graph outputs: there is nothing to compute")


def _check_dataflow(graph: onnx.GraphProto, path: Path) -> None:
    """Every node input is defined (graph input, initializer, node output) and no node depends
    on itself through a cycle."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    for node in graph.node:
        for name in node.input:
            if name not in defined and name not in producer:
                raise QCompileError(
                    f"{path}: node {node.name or node.op_type!r} reads {name!r}, which no node, graph "
                    "input or initializer defines (fix or re-export the model)")
    if _topological_order(graph) is None:
        raise QCompileError(f"{path}: the graph has a cycle (a node depends on its own output); "
                            "fix or re-export the model")


def _topological_order(graph: onnx.GraphProto) -> list[int] | None:
    """Node indices in a dependency order (Kahn, stable), or None when there is a cycle."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    deps = [{producer[n] for n in node.input if n in producer} for node in graph.node]
    readers: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            readers.setdefault(j, []).append(i)
    pending = [len(d) for d in deps]
    ready = [i for i, n in enumerate(pending) if n == 0]
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for r in readers.get(i, []):
            pending[r] -= 1
            if pending[r] == 0:
                ready.append(r)
    return order if len(order) == len(graph.node) else None


def _sort_nodes(graph: onnx.GraphProto) -> None:
    order = _topological_order(graph)
    nodes = [graph.node[i] for i in order]
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Each external tensor's file exists and is long enough (its bytes are read lazily)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        file = Path(tensor.base_dir) / tensor.location
        if not file.is_file():
            raise QCompileError(f"{path}: the external data file {tensor.location!r} of "
                                f"{value.name!r} is missing; keep it beside the model")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if file.stat().st_size < end:
            raise QCompileError(f"{path}: the external data file {tensor.location!r} is shorter than "
                                f"{value.name!r} needs ({file.stat().st_size} < {end} bytes); it is truncated")


def save_model(model: ir.Model, path: str | os.PathLike, external_threshold: int | None = None) -> Path:
    """Write ``model`` atomically: into a temporary folder beside ``path``, then rename.

    Weights go to ``<name>.data`` when they exceed ``external_threshold`` bytes (default:
    ``EXTERNAL_DATA_THRESHOLD``, read at call time), so no protobuf over 2 GB is ever built,
    or when the input had external data. A
    reader never sees a half-written file, and an interrupted save leaves nothing behind (the
    temporary folder is removed on any exception, KeyboardInterrupt included).
    """
    path = Path(path)
    check_writable_folder(path.parent)
    threshold = EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold
    # A weight still read lazily from the input's data file is copied into the output's own
    # (saved inline it would keep pointing at the input's file, by a relative path).
    lazy = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    # An input with external data gives an output with external data: no inline protobuf (and
    # its serialized copy) is built in memory.
    external = lazy or MAPPED_KEY in model.graph.meta or initializer_bytes(model) > threshold
    data_name = path.name + ".data"
    for file in external_files(model):
        if file.resolve() in ((path.parent / data_name).resolve(), path.resolve()):
            raise QCompileError(f"writing {path} would replace the input's external data file {file}; "
                                "choose another -o name")
    with tempfile.TemporaryDirectory(prefix=".qcompile-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        ir.save(model, staged, external_data=data_name if external else None)
        if external:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(staged, path)
    return path


def external_files(model: ir.Model) -> set[Path]:
    """The external data files the model's initializers are read from."""
    return {Path(v.const_value.base_dir) / v.const_value.location
            for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}


# Domains whose ops the pipeline knows or ONNX Runtime runs; nodes of any other domain are
# custom ops: compiled around, never changed.
KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml")


def unusual_input_notes(model: ir.Model) -> list[str]:
    """What a compile will leave untouched in ``model``, said in one line each (custom ops)."""
    custom = sorted({f"{n.domain}.{n.op_type}" for n in model.graph if n.domain not in KNOWN_DOMAINS})
    if not custom:
        return []
    return [f"custom ops left as they are (qcompile does not know them): {', '.join(custom)}"]


def check_writable_folder(folder: Path) -> None:
    """A one-line error unless ``folder`` exists and a file can be created in it."""
    if not folder.exists():
        raise QCompileError(f"output folder does not exist: {folder}")
    if not folder.is_dir():
        raise QCompileError(f"the output's parent is not a folder: {folder}")
    try:
        with tempfile.TemporaryFile(prefix=".qcompile-", dir=folder):
            pass
    except OSError as exc:
        raise QCompileError(f"cannot write in the output folder {folder} ({exc.strerror or exc}); "
                            "choose another -o path") from exc


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
