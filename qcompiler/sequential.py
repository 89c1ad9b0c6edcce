"""Sequential calibration: run the model stage by stage so that each stage sees the activations
of the already quantized stages before it (GPTQ quantizes "in order, with the quantized model's
activations feeding the next layer", Frantar et al. 2023).

A *stage* is the layers that read one activation (q/k/v of an attention; gate/up of an MLP).
Rerunning the model once per stage would cost ``stages × samples`` forward passes; instead:

* The graph, in topological order (it must be sorted already; the model is never modified), is **cut** right
  before the first node that reads a stage's weights. The nodes between two cuts form a
  **segment**: its own small ONNX model and ORT session, built when reached and dropped after.
* For every calibration feed the runner holds the values **live across the current cut**:
  produced before it (or graph inputs) and read after it, by a node or by a later stage's
  callback. Initializers and ``Constant`` outputs are never carried: each segment holds its own.
  Only nodes that lead to some stage's activation run; the tail after the last cut never does.
* At a cut, ``quantize(index, stage, batches)`` receives the stage activation's rows of every
  feed and returns the weights to use from then on. Stage weights are **runtime inputs** of every
  segment that reads them, fed with the returned arrays (the float ones when nothing was
  returned), so no session is rebuilt when a weight changes. A weight seen through a view (the
  tied LM head ``MatMul(h, Transpose(E))``) is fed to the MatMul directly; the view never runs.

Cost: one float forward pass per feed (each segment runs once per feed) plus one session build
per segment. Memory: the live values of all feeds at one cut (for a decoder: the residual
stream, the normalized input, rotary tables and the mask — a few hidden-state-sized tensors per
feed; ``RunSummary.peak_live_bytes``) plus one segment's session.

Nodes with subgraphs (If/Loop/Scan) run inside one segment; the outer-scope values their bodies
read count as reads of the node.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompiler import ir_utils
from qcompiler.calibration import MASK_INPUT, Feed, valid_positions
from qcompiler.errors import QCompileError, first_line
from runtime.session import create_session


@dataclasses.dataclass
class Stage:
    """Layers quantized together: each reads ``activation`` (X) and one of ``weights``
    (``node.inputs[1]``: the weight exactly as the op consumes it)."""

    activation: ir.Value
    weights: list[ir.Value]


# quantize(index in ``stages``, stage, rows [positions, K] of each feed) -> {weight name: array}
Quantize = Callable[[int, Stage, list[np.ndarray]], Mapping[str, np.ndarray] | None]


@dataclasses.dataclass(frozen=True)
class RunSummary:
    segments: int         # segments run (one ORT session each)
    peak_live_bytes: int  # the most bytes held across one cut, all feeds together


def stages_by_activation(nodes: Iterable[ir.Node]) -> list[Stage]:
    """One stage per distinct activation (input 0) of the weighted ``nodes``, first seen first."""
    stages: dict[ir.Value, Stage] = {}
    for node in nodes:
        stage = stages.setdefault(node.inputs[0], Stage(node.inputs[0], []))
        if node.inputs[1] not in stage.weights:
            stage.weights.append(node.inputs[1])
    return list(stages.values())


def run_stages(
    model: ir.Model,
    stages: list[Stage],
    feeds: Iterable[Feed],
    quantize: Quantize,
    *,
    mask_padding: bool = True,
    progress: bool = True,
) -> RunSummary:
    """Run ``model`` over ``feeds`` segment by segment, calling ``quantize`` at each stage.

    ``quantize(index, stage, batches)``: ``batches`` holds, per feed, the rows ``[positions, K]``
    of ``stage.activation`` (padded positions dropped when ``mask_padding`` and the feed has an
    ``attention_mask``); it returns ``{weight name: array}`` (same shape as the float weight) for
    the stage's weights to use from then on, or None / ``{}`` to keep them in float. Stages may
    come in any order; they are called in graph order. ``model`` is left unchanged.
    """
    feeds = [dict(feed) for feed in feeds]
    if not feeds:
        raise QCompileError("the calibration data holds no samples")
    segments = _plan(model.graph, stages)
    if not segments:
        return RunSummary(segments=0, peak_live_bytes=0)
    state = [_graph_inputs(model.graph, feed, segments[0].live_before) for feed in feeds]
    masks = [feed.get(MASK_INPUT) if mask_padding else None for feed in feeds]
    current: dict[str, np.ndarray] = {}  # weights returned so far
    peak, runs = 0, 0
    bar = tqdm(total=len(stages), desc="sequential", unit="stage", disable=not progress)
    with bar:
        for segment in segments:
            if segment.nodes:
                weights = {w.name: current[w.name] if w.name in current else _float_weight(w)
                           for w in segment.weights}
                _run_segment(model, segment, state, weights)
                runs += 1
            for values in state:
                for name in [n for n in values if n not in segment.live_after]:
                    del values[name]
            peak = max(peak, sum(a.nbytes for values in state for a in values.values()))
            bar.set_postfix(peak_live=f"{peak / 2**20:.0f}MiB")
            for index in segment.stages:
                stage = stages[index]
                batches = [_rows(values[stage.activation.name], mask) for values, mask in zip(state, masks)]
                current.update(_accept(index, stage, quantize(index, stage, batches) or {}))
                bar.update(1)
    return RunSummary(segments=runs, peak_live_bytes=peak)


# --- planning ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Segment:
    nodes: list[ir.Node]             # Constant nodes it reads first, then its nodes in order
    inputs: list[ir.Value]           # carried values and stage weights it reads
    weights: list[ir.Value]          # the stage weights among ``inputs``
    outputs: list[ir.Value]          # values it produces that are still needed after it
    initializers: list[ir.Value]
    live_before: set[str]
    live_after: set[str]
    stages: list[int] = dataclasses.field(default_factory=list)  # quantized at its end


def _plan(graph: ir.Graph, stages: list[Stage]) -> list[_Segment]:
    """Cut ``graph`` before the first reader of each stage's weights (see the module docstring)."""
    reads = {node: _reads(node, graph) for node in graph}
    order = _sorted_nodes(graph, reads)
    position = {node: p for p, node in enumerate(order)}
    weight_stage = _weight_stages(stages)

    cuts: dict[int, int] = {}
    for p, node in enumerate(order):
        for value in reads[node]:
            if value in weight_stage:
                cuts.setdefault(weight_stage[value], p)
    for i, stage in enumerate(stages):
        if i not in cuts:
            names = [w.name for w in stage.weights]
            raise QCompileError(f"stage {i}: no node reads its weights {names}")
        _check_activation(i, stage, weight_stage, position, order[cuts[i]], graph)

    # Only nodes some stage activation depends on run; a stage weight stops the walk (it is fed).
    needed: set[ir.Node] = set()
    stack = [stage.activation for stage in stages]
    while stack:
        node = stack.pop().producer()
        if node is None or node in needed or _is_constant_node(node):
            continue
        for out in node.outputs:
            if out in weight_stage:
                raise QCompileError(
                    f"weight {out.name!r} comes from node {node.name!r}, whose other outputs are "
                    "also used: it cannot be fed separately")
        needed.add(node)
        stack.extend(v for v in reads[node] if v not in weight_stage)

    # A value is live across cut c when defined before c and used at or after c.
    defined: dict[ir.Value, int] = {v: -1 for v in graph.inputs}
    last_use: dict[ir.Value, int] = {}
    for node in needed:
        defined.update((out, position[node]) for out in node.outputs)
        for value in reads[node]:
            last_use[value] = max(last_use.get(value, -1), position[node])
    for i, stage in enumerate(stages):
        last_use[stage.activation] = max(last_use.get(stage.activation, -1), cuts[i])
    carried = [(v, defined[v], u) for v, u in last_use.items() if v in defined]

    def live(cut: int) -> set[str]:
        return {v.name for v, d, u in carried if d < cut <= u}

    by_cut = collections.defaultdict(list)
    for i in sorted(range(len(stages)), key=lambda i: (cuts[i], i)):
        by_cut[cuts[i]].append(i)
    segments, start = [], 0
    for cut, stage_indices in sorted(by_cut.items()):
        nodes = [n for n in order[start:cut] if n in needed]
        segments.append(_segment(nodes, reads, weight_stage, live(start), live(cut), stage_indices))
        start = cut
    return segments


def _segment(nodes, reads, weight_stage, live_before, live_after, stage_indices) -> _Segment:
    produced = {out for node in nodes for out in node.outputs}
    inputs, initializers, constants = {}, {}, {}
    for node in nodes:
        for value in reads[node]:
            producer = value.producer()
            if value in produced:
                continue
            if producer is not None and _is_constant_node(producer) and value not in weight_stage:
                constants[producer] = None
            elif value in weight_stage or value.is_graph_input() or producer is not None:
                inputs[value] = None  # fed weights, graph inputs and carried values
            elif value.const_value is not None:
                initializers[value] = None
            else:
                raise QCompileError(f"node {node.name!r} reads {value.name!r}, which nothing produces")
    outputs = [out for node in nodes for out in node.outputs if out.name in live_after]
    return _Segment(
        nodes=[*constants, *nodes],
        inputs=list(inputs),
        weights=[v for v in inputs if v in weight_stage],
        outputs=outputs,
        initializers=list(initializers),
        live_before=live_before,
        live_after=live_after,
        stages=stage_indices,
    )


def _weight_stages(stages: list[Stage]) -> dict[ir.Value, int]:
    weight_stage: dict[ir.Value, int] = {}
    for i, stage in enumerate(stages):
        for weight in stage.weights:
            if weight_stage.get(weight, i) != i:
                raise QCompileError(f"weight {weight.name!r} is in stages {weight_stage[weight]} and {i}")
            if ir_utils.constant_through_views(weight) is None:
                raise QCompileError(
                    f"stage {i}: weight {weight.name!r} is not a constant (nor a view of one)")
            weight_stage[weight] = i
    return weight_stage


def _check_activation(i: int, stage: Stage, weight_stage, position, first_reader: ir.Node,
                      graph: ir.Graph) -> None:
    x = stage.activation
    producer = x.producer()
    if x.graph is not graph or x in weight_stage or ir_utils.constant_array(x) is not None:
        raise QCompileError(f"stage {i}: activation {x.name!r} is not a computed value of the main graph")
    if producer is not None and position[producer] >= position[first_reader]:
        raise QCompileError(
            f"stage {i}: activation {x.name!r} is computed after node {first_reader.name!r} "
            "first reads the stage's weights")


def _reads(node: ir.Node, graph: ir.Graph) -> list[ir.Value]:
    """``node``'s inputs, plus the values of ``graph`` that its subgraphs read (outer scope)."""
    values = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            bodies = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            bodies = list(attr.as_graphs())
        else:
            continue
        for body in bodies:
            for inner in ir.traversal.RecursiveGraphIterator(body):
                values.extend(v for v in inner.inputs if v is not None and v.graph is graph)
    return list(dict.fromkeys(values))


def _sorted_nodes(graph: ir.Graph, reads) -> list[ir.Node]:
    """The graph's nodes, which must already be in topological order (``CanonicalizePass``
    sorts them; this module never modifies the model)."""
    nodes, seen = list(graph), set()
    for node in nodes:
        late = [v.name for v in reads[node] if v.producer() is not None and v.producer().graph is graph
                and v.producer() not in seen and v.producer() is not node]
        if late:
            raise QCompileError(f"node {node.name!r} reads {late[0]!r} before it is computed: sort the graph first")
        seen.add(node)
    return nodes


def _is_constant_node(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain == ""


# --- running ----------------------------------------------------------------------------------


def _graph_inputs(graph: ir.Graph, feed: Feed, names: set[str]) -> dict[str, np.ndarray]:
    arrays = {}
    for value in graph.inputs:
        if value.name not in names:
            continue
        if value.name in feed:
            arrays[value.name] = np.asarray(feed[value.name])
        elif value.const_value is not None:
            arrays[value.name] = value.const_value.numpy()
        else:
            raise QCompileError(f"a calibration sample lacks the model input {value.name!r}")
    return arrays


def _run_segment(model: ir.Model, segment: _Segment, state: list[dict], weights: dict) -> None:
    carried = [v.name for v in segment.inputs if v.name not in weights]
    names = [v.name for v in segment.outputs]
    with _session(model, segment, {**state[0], **weights}) as session:
        for values in state:
            try:
                outputs = session.run(names, {**{n: values[n] for n in carried}, **weights})
            except Exception as exc:
                raise QCompileError(f"the model failed on a calibration sample: {first_line(exc)}") from exc
            values.update(zip(names, outputs))


@contextlib.contextmanager
def _session(model: ir.Model, segment: _Segment, examples: Mapping[str, np.ndarray]) -> Iterator:
    """An ORT session for the segment (a clone: the model's values and nodes are untouched)."""
    view = ir.GraphView(segment.inputs, segment.outputs, nodes=segment.nodes,
                        initializers=segment.initializers, opset_imports=dict(model.graph.opset_imports),
                        name="segment")
    graph = view.clone()
    for value in graph.inputs:
        value.const_value = None  # a fed weight keeps no initializer
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.from_numpy(examples[value.name].dtype))
    piece = ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values()))
    size = sum(v.const_value.nbytes for v in segment.initializers)
    if size < ir_utils.EXTERNAL_DATA_THRESHOLD:
        yield create_session(ir.to_proto(piece).SerializeToString())
        return
    with tempfile.TemporaryDirectory(prefix="qcompile-segment-") as tmp:
        path = Path(tmp) / "segment.onnx"
        ir.save(piece, path, external_data="segment.onnx.data")
        yield create_session(path)


def _float_weight(weight: ir.Value) -> np.ndarray:
    return np.ascontiguousarray(ir_utils.constant_through_views(weight))


def _rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = valid_positions(x, mask)
    return x.reshape(-1, x.shape[-1])


def _accept(index: int, stage: Stage, returned: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The returned weights, checked against the stage's float weights and made contiguous."""
    weights = {w.name: w for w in stage.weights}
    accepted = {}
    for name, array in returned.items():
        if name not in weights:
            raise QCompileError(
                f"stage {index}: quantize returned {name!r}, not one of its weights {sorted(weights)}")
        reference = ir_utils.constant_through_views(weights[name])
        array = np.ascontiguousarray(array, dtype=reference.dtype)
        if array.shape != reference.shape:
            raise QCompileError(
                f"stage {index}: quantize returned {name!r} shaped {array.shape}, "
                f"the weight is {reference.shape}")
        accepted[name] = array
    return accepted
