"""SmoothQuant: move activation outliers into the weights by an exact per-channel rescaling.

For the linear layers reading one activation ``X`` (a *group*: q/k/v, gate/up, or one layer)::

    X W_i = (X diag(s)⁻¹) (diag(s) W_i)                       (qcompiler.smoothing chooses s)

``diag(s) W_i`` scales row ``j`` of each weight by ``s_j`` (a weight the group does not own,
e.g. the LM head tied to the embedding table, gets a private copy). ``X diag(s)⁻¹`` has to be
produced by whatever makes ``X`` — its *absorber*:

* ``LayerNormalization(x, γ, β)``: ``(n(x)·γ + β)/s = n(x)·(γ/s) + β/s`` → ``γ/s``, ``β/s``.
* RMSNorm in any exported form — ``Mul(γ, x·Reciprocal(Sqrt(ReduceMean(x²)+ε)))``,
  ``Mul(x / Sqrt(…), γ)`` — and any Mul by a constant per-channel vector: ``γ/s``. An unfused
  LayerNorm ``Add(Mul(n, γ), β)``: ``γ/s``, ``β/s``.
* A linear layer ``U = x W₁ (+ b₁)`` whose output reaches ``X`` through ops that act on each
  channel linearly, ``X = P(U)`` with ``P(U diag(t)) = P(U) diag(t[π])``: then ``W₁``'s output
  columns and ``b₁`` take ``1/t``, where ``t[π(j)] = s_j``. Ops allowed on the path: Reshape,
  Transpose, (Un)Squeeze, Expand, Flatten, Identity (they move channels), ``MatMul(A, path)``
  (attention's ``softmax·V`` mixes tokens, not channels) and ``Mul(path, other)`` with ``other``
  independent of ``U`` (SwiGLU's ``silu(gate) ⊙ up``: down_proj's input is smoothed through
  up_proj). ``π`` (which channel of ``U`` each channel of ``X`` copies: with grouped-query
  attention three query heads read one value head) is measured, not derived: the path is
  cloned twice and run on one calibration sample with ``U`` replaced by ones and by the channel
  number ``c + 1``; the ratio is ``π(j) + 1`` at every position. Channels with one source
  share one ``s``.
* Otherwise an explicit ``Mul(X, 1/s)`` before the group (reported), only when it cuts the
  group's quantized output error at least ``EXPLICIT_MUL_GAIN`` times.

Refused, with the reason recorded: an absorber constant also read by other nodes; an absorber
output or path value read outside the group (those readers would see ``X/s``); graph outputs.

``α`` is searched per group on the calibration data (``qcompiler.smoothing.search_alpha``:
the layer's quantized output error, weights int8 per channel, activations by the scheme that
will run; static schemes cross-validated on the two halves of the samples, so that the search
sees what a range fitted to some data does to spikes it never saw), or fixed. ``enabled=None``
(auto) smooths only when some group's activation has outlier channels (max/median of the
channel maxima ≥ ``OUTLIER_RATIO``).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from passes.insert_static_qdq import SMOOTHED_ACTIVATION_KEY
from passes.select_targets import TARGET_KEY, QuantTarget, targets
from qcompiler import ir_utils, smoothing
from qcompiler.calibration import FeedSource, collect_fold_stats, count_samples, run_once
from qcompiler.config import CalibrationConfig

OUTLIER_RATIO = 20.0
EXPLICIT_MUL_GAIN = 2.0
ROW_SAMPLE = 256  # calibration rows per activation for the α search, uniform ...
HEAVY_ROWS = 64  # ... and those of largest magnitude (RowSample.weighted)
SMOOTHED_KEY = "qcompile.smoothed"
PATH_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Flatten", "Identity"})
MAX_PATH = 12


# --- absorbers -------------------------------------------------------------------------------


@dataclasses.dataclass
class ConstantScale:
    """``X`` is a per-channel constant times something (norm γ, and β when added after)."""

    kind: str
    constants: list[ir.Value]

    tied = None

    def apply(self, s: np.ndarray) -> None:
        for value in self.constants:
            array = ir_utils.constant_array(value)
            if array.size == 1:
                array = np.full(s.shape, array.reshape(()), array.dtype)
            set_constant(value, (array / s).astype(array.dtype))


@dataclasses.dataclass
class LinearProducer:
    """``X = P(U)``, ``U = x W₁ (+ b₁)``; ``tied`` is the measured channel map ``π``."""

    node: ir.Node
    out_axis: int  # the output-channel axis of W₁ (1 for MatMul, 0 for Gemm with transB)
    bias: ir.Value | None
    start: ir.Value  # U
    path: list[ir.Node]  # from U to X, in order
    tied: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return f"linear {self.node.name}" + (" (through " + "→".join(n.op_type for n in self.path) + ")" if self.path else "")

    def apply(self, s: np.ndarray) -> None:
        weight = self.node.inputs[1]
        w = ir_utils.constant_array(weight)
        t = np.ones(w.shape[self.out_axis], np.float32)
        t[self.tied] = s
        shape = [1, 1]
        shape[self.out_axis] = -1
        scaled = (w / t.reshape(shape)).astype(w.dtype)
        set_constant(weight, scaled)
        record = self.node.meta.get(TARGET_KEY)
        if record is not None:  # the producer is itself a target: keep its record in step
            record.weight = scaled
        if self.bias is not None:
            b = ir_utils.constant_array(self.bias)
            set_constant(self.bias, (b / t.reshape(b.shape)).astype(b.dtype))


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Give the readers of a constant (an initializer or a Constant node's output) ``array``:
    an initializer is updated in place, a Constant node's readers get a new initializer."""
    if value.producer() is None:
        value.const_value = ir.tensor(array, name=value.name)
        return
    graph = value.producer().graph
    replacement = ir_utils.initializer(graph, f"{value.name}.smoothed", array)
    value.replace_all_uses_with(replacement)


# --- groups ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    activation: ir.Value
    targets: list[QuantTarget]
    absorber: ConstantScale | LinearProducer | None = None
    refusal: str = ""

    @property
    def name(self) -> str:
        return ",".join(t.node.name for t in self.targets)

    def stacked_weight(self) -> np.ndarray:
        """The group's weights oriented ``[K, N]`` and stacked along N."""
        return np.concatenate([t.weight if t.channel_axis == 1 else t.weight.T for t in self.targets], axis=1)


def groups(model: ir.Model) -> list[Group]:
    """The MatMul/Gemm targets grouped by the activation they read, with absorbers found."""
    by_activation: dict[int, Group] = {}
    for target in targets(model):
        if target.op_type in ("MatMul", "Gemm") and SMOOTHED_KEY not in target.node.meta:
            group = by_activation.setdefault(id(target.activation), Group(target.activation, []))
            group.targets.append(target)
    found = list(by_activation.values())
    for group in found:
        group.absorber, group.refusal = find_absorber(group)
    return found


def _constant(value: ir.Value | None) -> bool:
    return value is not None and ir_utils.constant_array(value) is not None


def _only_reader(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(use.node is node for use in value.uses())


def _per_channel(array: np.ndarray, channels: int) -> bool:
    return array.size in (1, channels) and all(d == 1 for d in array.shape[:-1])


def find_absorber(group: Group) -> tuple[ConstantScale | LinearProducer | None, str]:
    """The op that can produce ``X diag(s)⁻¹`` exactly, or None and why not."""
    x = group.activation
    readers = {id(t.node) for t in group.targets}
    if x.is_graph_output():
        return None, "the activation is a graph output"
    others = [use.node for use in x.uses() if id(use.node) not in readers]
    if others:
        return None, f"the activation is also read by {others[0].op_type} {others[0].name}"
    node = x.producer()
    if node is None:
        return None, "the activation is a graph input"
    channels = group.targets[0].input_channels
    if node.op_type == "LayerNormalization" and node.domain == "":
        return _layer_norm(node)
    if node.op_type in ("Mul", "Add") and node.domain == "":
        scale = _constant_scale(node, channels)
        if scale is not None:
            return scale
    return _linear_path(x)


def _layer_norm(node: ir.Node) -> tuple[ConstantScale | None, str]:
    if node.attributes.get_int("axis", -1) != -1:
        return None, "LayerNormalization over more than the last axis"
    constants = [v for v in node.inputs[1:3] if v is not None]
    if not all(_constant(v) for v in constants):
        return None, "LayerNormalization with non-constant scale/bias"
    shared = [v.name for v in constants if not _only_reader(v, node)]
    if shared:
        return None, f"LayerNormalization's {shared[0]} is shared with other nodes"
    return ConstantScale("LayerNormalization", constants), ""


def _constant_scale(node: ir.Node, channels: int) -> tuple[ConstantScale | None, str] | None:
    """``Mul(γ, y)`` or ``Add(Mul(y, γ), β)`` with per-channel constants; None: not this form."""
    if node.op_type == "Add":
        beta = next((v for v in node.inputs if _constant(v)), None)
        other = next((v for v in node.inputs if not _constant(v)), None)
        mul = other.producer() if other is not None else None
        if beta is None or mul is None or mul.op_type != "Mul" or not _only_reader(other, node):
            return None
        found = _constant_scale(mul, channels)
        if found is None or found[0] is None:
            return found
        if not _per_channel(ir_utils.constant_array(beta), channels):
            return None
        if not _only_reader(beta, node):
            return None, f"the bias {beta.name} is shared with other nodes"
        return ConstantScale("LayerNorm (unfused)", found[0].constants + [beta]), ""
    gamma = next((v for v in node.inputs if _constant(v)), None)
    other = next((v for v in node.inputs if not _constant(v)), None)
    if gamma is None or other is None or not _per_channel(ir_utils.constant_array(gamma), channels):
        return None
    if not _only_reader(gamma, node):
        return None, f"the scale {gamma.name} is shared with other nodes"
    return ConstantScale("RMSNorm" if _rms_normalized(other) else "per-channel Mul", [gamma]), ""


def _rms_normalized(value: ir.Value) -> bool:
    """``x · Reciprocal(Sqrt(…ReduceMean…))``, ``x · Rsqrt``-like or ``x / Sqrt(…)``."""
    node = value.producer()
    if node is None or node.op_type not in ("Mul", "Div"):
        return False
    frontier = [v.producer() for v in node.inputs[1 if node.op_type == "Div" else 0:] if v is not None]
    for _ in range(4):
        if any(n is not None and n.op_type == "ReduceMean" for n in frontier):
            return True
        frontier = [v.producer() for n in frontier if n is not None and n.op_type in
                    ("Reciprocal", "Sqrt", "Add", "Div") for v in n.inputs if v is not None]
    return False


def _linear_output(value: ir.Value) -> tuple[ir.Node, int, ir.Value | None] | None:
    """(linear node, output axis of its weight, bias) when ``value`` is ``x W₁ (+ b₁)``."""
    node, bias = value.producer(), None
    if node is not None and node.op_type == "Add" and node.domain == "":
        bias = next((v for v in node.inputs if _constant(v)), None)
        inner = next((v for v in node.inputs if not _constant(v)), None)
        if bias is None or inner is None or not _only_reader(inner, node):
            return None
        node = inner.producer()
    if node is None or node.domain != "" or node.op_type not in ("MatMul", "Gemm") or not _constant(node.inputs[1]):
        return None
    w = ir_utils.constant_array(node.inputs[1])
    if w.ndim != 2:
        return None
    axis = 1
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0) or (bias is not None and len(node.inputs) > 2):
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        axis = 0 if node.attributes.get_int("transB", 0) else 1
    if bias is not None and ir_utils.constant_array(bias).size != w.shape[axis]:
        return None
    return node, axis, bias


def _path_operands(node: ir.Node) -> list[int]:
    if node.domain != "":
        return []
    if node.op_type in PATH_OPS:
        return [0]
    if node.op_type == "MatMul" and not _constant(node.inputs[1]):
        return [1]  # softmax(QKᵀ) · V: contracts tokens, keeps V's channels
    if node.op_type == "Mul":
        return [i for i, v in enumerate(node.inputs) if not _constant(v)]
    return []


def _linear_path(x: ir.Value) -> tuple[LinearProducer | None, str]:
    """Search back from ``x`` through per-channel-linear ops for a linear producer."""
    reasons: list[str] = []
    stack: list[tuple[ir.Value, list[ir.Node]]] = [(x, [])]
    while stack:
        value, path = stack.pop()
        linear = _linear_output(value)
        if linear is not None:
            node, axis, bias = linear
            candidate = LinearProducer(node, axis, bias, value, path)
            refusal = _path_refusal(candidate, x)
            if not refusal:
                return candidate, ""
            reasons.append(refusal)
            continue
        node = value.producer()
        if node is None or len(path) >= MAX_PATH:
            continue
        for index in reversed(_path_operands(node)):
            stack.append((node.inputs[index], [node, *path]))
    if reasons:
        return None, reasons[0]
    producer = x.producer()
    return None, f"no absorber: the activation comes from {producer.op_type} {producer.name}"


def _downstream(start: ir.Value) -> set[int]:
    """ids of every node that (transitively) reads ``start``."""
    seen: set[int] = set()
    frontier = [start]
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            if id(use.node) not in seen:
                seen.add(id(use.node))
                frontier.extend(use.node.outputs)
    return seen


def _path_refusal(candidate: LinearProducer, x: ir.Value) -> str:
    node = candidate.node
    for value in [node.inputs[1]] + ([candidate.bias] if candidate.bias is not None else []):
        if len(value.uses()) != 1 or value.is_graph_output():
            return f"{node.name}'s {value.name} is shared with other nodes"
    path_ids = {id(n) for n in candidate.path}
    values = [candidate.start] + [n.outputs[0] for n in candidate.path[:-1]]
    for value in values:
        outside = [u.node for u in value.uses() if id(u.node) not in path_ids]
        if outside or value.is_graph_output():
            what = f"{outside[0].op_type} {outside[0].name}" if outside else "a graph output"
            return f"{value.name} (between {node.name} and the group) is also read by {what}"
    after_start = _downstream(candidate.start)
    for path_node in candidate.path:
        for index, value in enumerate(path_node.inputs):
            if value is None or index in _path_operands(path_node) and _on_path(value, candidate):
                continue
            producer = value.producer()
            if producer is not None and id(producer) in after_start:
                return f"{path_node.op_type} {path_node.name} combines two values computed from {node.name}"
    return ""


def _on_path(value: ir.Value, candidate: LinearProducer) -> bool:
    return value is candidate.start or any(value is n.outputs[0] for n in candidate.path)


# --- measuring the channel maps ----------------------------------------------------------------


def measure_channel_maps(model: ir.Model, producers: list[tuple[LinearProducer, ir.Value]], feed) -> list[str]:
    """Set ``tied`` (π) on each ``(producer, X)`` by running cloned paths (module docstring);
    returns a refusal per producer ("" when measured)."""
    graph = model.graph
    added_nodes: list[ir.Node] = []
    outputs: list[tuple[ir.Value, ir.Value]] = []
    for producer, _ in producers:
        channels = ir_utils.constant_array(producer.node.inputs[1]).shape[producer.out_axis]
        pair = []
        for probe in (np.ones(channels, np.float32), np.arange(1, channels + 1, dtype=np.float32)):
            pair.append(_clone_path(graph, producer, probe, added_nodes))
        outputs.append(tuple(pair))
    graph.extend(added_nodes)
    try:
        flat = [v for pair in outputs for v in pair]
        values = run_once(model, flat, feed)
    finally:
        graph.remove(list(reversed(added_nodes)), safe=True)
    refusals = []
    for (producer, _), (ones, ids) in zip(producers, outputs):
        tied, refusal = channel_map(values[ones.name], values[ids.name])
        producer.tied = tied
        refusals.append(refusal)
    return refusals


def resolve_linear_absorbers(model: ir.Model, found: list[Group], feed) -> None:
    """Measure π for the groups whose absorber is a linear layer; a group whose path turns out
    not to be channel-wise loses its absorber (with the reason as its refusal)."""
    linear = [(g.absorber, g.activation) for g in found if isinstance(g.absorber, LinearProducer)]
    if not linear:
        return
    refusals = measure_channel_maps(model, linear, feed)
    for group in found:
        if isinstance(group.absorber, LinearProducer) and group.absorber.tied is None:
            group.refusal = refusals[[p for p, _ in linear].index(group.absorber)]
            group.absorber = None


def _clone_path(graph: ir.Graph, producer: LinearProducer, probe: np.ndarray, added: list[ir.Node]) -> ir.Value:
    """A copy of the path from ``U`` to ``X`` that reads ``probe`` broadcast to ``U``'s shape."""
    stem = ir_utils.unique_name(graph, f"{producer.node.name}.probe", "node")
    vector = ir.node("Constant", [], attributes={"value": ir.tensor(probe)}, name=f"{stem}.vector")
    shape = ir.node("Shape", [producer.start], name=f"{stem}.shape")
    expand = ir.node("Expand", [vector.outputs[0], shape.outputs[0]], name=f"{stem}.expand")
    added += [vector, shape, expand]
    current = {id(producer.start): expand.outputs[0]}
    for i, node in enumerate(producer.path):
        inputs = [current.get(id(v), v) if v is not None else None for v in node.inputs]
        clone = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                        name=f"{stem}.{i}")
        current[id(node.outputs[0])] = clone.outputs[0]
        added.append(clone)
    for i, node in enumerate(added[-len(producer.path) - 3:]):
        node.outputs[0].name = f"{node.name}.out"
    out = added[-1].outputs[0]
    out.type = ir.TensorType(ir.DataType.FLOAT)
    return out


def channel_map(ones: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray | None, str]:
    """``π`` from the two probe outputs (``ids / ones = π + 1``), or None and why."""
    ones = ones.reshape(-1, ones.shape[-1]).astype(np.float64)
    ids = ids.reshape(-1, ids.shape[-1]).astype(np.float64)
    valid = np.abs(ones) > 1e-6 * max(np.abs(ones).max(), 1e-30)
    if not valid.any(axis=0).all():
        return None, "the path zeroes some channels"
    ratio = np.where(valid, ids / np.where(valid, ones, 1.0), np.nan)
    source = np.nanmedian(ratio, axis=0)
    rounded = np.rint(source)
    spread = np.nanmax(np.abs(ratio - rounded), axis=0)
    if np.any(spread > 1e-3 * rounded) or np.any(rounded < 1):
        return None, "the path mixes channels"
    return (rounded - 1).astype(np.int64), ""


# --- the pass ----------------------------------------------------------------------------------


class SmoothQuantPass(ir.passes.InPlacePass):
    """Smooth every group whose α search (or the fixed ``alpha``) says so.

    ``enabled``: True (always), None (auto: only when outlier channels are found).
    ``scheme``: the activation scheme that will run (the search quantizes as it does).
    ``decisions``: one dict per group, for reports and provenance.
    """

    def __init__(
        self,
        feeds: FeedSource,
        scheme: str,
        alpha: float | None = None,
        enabled: bool | None = None,
        calibration: CalibrationConfig = CalibrationConfig(),
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.feeds, self.scheme, self.alpha, self.enabled = feeds, scheme, alpha, enabled
        self.calibration, self.progress = calibration, progress
        self.summary = ""
        self.decisions: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.decisions = []
        found = groups(model)
        if not found:
            self.summary = "no MatMul/Gemm to smooth"
            return ir.passes.PassResult(model, modified=False)
        folds = self._observe(model, [g.activation for g in found])
        worst = max(smoothing.outlier_ratio(smoothing.merged_range(folds[g.activation.name]).absmax)
                    for g in found)
        if self.enabled is None and worst < OUTLIER_RATIO:
            self.summary = f"no outlier channels (largest max/median {worst:.1f} < {OUTLIER_RATIO:g}): not applied"
            return ir.passes.PassResult(model, modified=False)
        resolve_linear_absorbers(model, found, next(iter(self.feeds())))
        outcomes: collections.Counter = collections.Counter()
        for group in found:
            outcome = self._smooth(model.graph, group, folds[group.activation.name])
            outcomes[outcome] += 1
        self.summary = f"outlier ratio up to {worst:.0f}; " + ", ".join(
            f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        return ir.passes.PassResult(model, modified=any(d["alpha"] is not None for d in self.decisions))

    def _observe(self, model: ir.Model, activations: list[ir.Value]) -> dict[str, list[smoothing.Observed]]:
        """Each activation's calibration rows and channel ranges; for static schemes in two folds
        (the first and second half of the samples), which the α search cross-validates."""
        n = 0
        if self.scheme in smoothing.STATIC_SCHEMES:
            n = count_samples(self.feeds, self.calibration.max_samples)
        folds = 2 if n >= 2 else 1
        by_fold = collect_fold_stats(
            model, activations, self.feeds(), folds=folds, fold_of=lambda i: 2 * i // n if folds == 2 else 0,
            mask_padding=self.calibration.mask_padding, max_samples=self.calibration.max_samples,
            progress=self.progress, keep_rows=ROW_SAMPLE, histogram=False, heavy_rows=HEAVY_ROWS,
        )
        return {v.name: [_observed(stats[v.name]) for stats in by_fold] for v in activations}

    def _smooth(self, graph: ir.Graph, group: Group, observed: list[smoothing.Observed]) -> str:
        grid = (self.alpha,) if self.alpha is not None else smoothing.ALPHA_GRID
        tied = group.absorber.tied if group.absorber is not None else None
        choice = smoothing.search_alpha(observed, group.stacked_weight(), self.scheme, grid, tied)
        decision = {"layers": group.name, "absorber": group.absorber.kind if group.absorber else None,
                    "refusal": group.refusal, "alpha": choice.alpha,
                    "error": choice.error, "unsmoothed_error": choice.unsmoothed_error}
        self.decisions.append(decision)
        if choice.alpha is None:
            return "left (no gain)"
        if group.absorber is None and self.alpha is None and choice.gain < EXPLICIT_MUL_GAIN:
            decision.update(alpha=None, error=choice.unsmoothed_error)
            return "left (no absorber, small gain)"
        if group.absorber is not None:
            group.absorber.apply(choice.scales)
            outcome = "folded into " + group.absorber.kind.split(" ")[0]
        else:
            _insert_mul(graph, group, choice.scales)
            outcome = "explicit Mul"
            decision["absorber"] = "explicit Mul"
        for target in group.targets:
            scale_weight(graph, target, choice.scales)
            target.node.meta[SMOOTHED_KEY] = choice.alpha
            target.activation.meta[SMOOTHED_ACTIVATION_KEY] = choice.alpha  # ranges: min-max
        return outcome


def _observed(stats) -> smoothing.Observed:
    rows, weights = stats.rows.weighted()
    return smoothing.Observed(rows, smoothing.ChannelRange(stats.channel_min, stats.channel_max), weights)


def scale_weight(graph: ir.Graph, target: QuantTarget, s: np.ndarray) -> None:
    """Row ``j`` of the weight (as ``[K, N]``) times ``s_j``; a private copy unless owned."""
    shape = (-1, 1) if target.channel_axis == 1 else (1, -1)
    scaled = (target.weight * s.reshape(shape)).astype(target.weight.dtype)
    target.weight = scaled
    value = target.node.inputs[1]
    owned = value.const_value is not None and len(value.uses()) == 1 and not value.is_graph_output()
    if owned and ir_utils.constant_array(value).shape == scaled.shape:
        value.const_value = ir.tensor(scaled, name=value.name)
    else:
        stem = f"{target.node.name or 'weight'}.smoothed"
        target.node.replace_input_with(1, ir_utils.initializer(graph, stem, scaled))


def _insert_mul(graph: ir.Graph, group: Group, s: np.ndarray) -> None:
    first = min(group.targets, key=lambda t: list(graph).index(t.node)).node
    b = ir_utils.NodeBuilder(graph, first, f"{group.activation.name}.smooth")
    smoothed = b.op("Mul", [group.activation, b.const("inverse_scale", (1.0 / s).astype(np.float32))], "out")
    smoothed.type, smoothed.shape = group.activation.type, group.activation.shape
    for target in group.targets:
        target.node.replace_input_with(0, smoothed)
        target.activation = smoothed
