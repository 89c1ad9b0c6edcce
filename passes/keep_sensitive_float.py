"""Put back in float the fewest quantized layers that make the model meet an accuracy target.

Runs on the QDQ model right after ``InsertStaticQDQPass``, before clean-up: each target ``t``
then reads ``DQ(Q(x_t))`` and ``DQ(W_t^q)``, and its float weight is still known
(``QuantTarget.weight``). To measure many choices cheaply the pass serializes one *switchboard*
model: for every target a boolean graph input ``f_t`` and ::

    x'_t = Where(f_t, x_t, DQ(Q(x_t)))     W'_t = Where(f_t, W_t, DQ(W_t^q))
    b'_t = Where(f_t, b_t, b_t − E[ΔW·x])  (the bias before bias correction, if corrected)

so that one ONNX Runtime session runs the model with any set of layers in float (the quantized
path is simulated in float, as the QDQ reference is). A second model adds, per target, a float
copy of the op fed the quantized model's own activation: the layer's own SQNR. The search is
``qcompiler.sensitivity.choose_float_layers``; the layers it keeps in float are rewired in the
real model (float activation, float weight, original bias), and clean-up drops their Q/DQ.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import onnx
import onnx_ir as ir

from passes.bias_correction import BIAS_BEFORE_KEY
from passes.quantize_weights import WEIGHT_KEY
from passes.select_targets import TARGET_KEY, QuantTarget
from qcompiler import ir_utils, sensitivity
from qcompiler.calibration import FeedSource
from qcompiler.errors import QCompileError
from qcompiler.layer_error import ErrorStats
from runtime.session import create_session

DECISION_KEY = "qcompile.kept_float"


@dataclasses.dataclass
class _Switch:
    """One quantized target and the values that put it back in float."""

    target: QuantTarget
    x: ir.Value  # the activation before QuantizeLinear
    bias: tuple[ir.Node, int, ir.Value] | None  # (node, input index, bias before correction)

    @property
    def name(self) -> str:
        return self.target.node.name

    @property
    def flag(self) -> str:
        return f"{self.name}.keep_float"


def _switches(model: ir.Model) -> list[_Switch]:
    found = []
    for node in model.graph:
        target = node.meta.get(TARGET_KEY)
        if target is None or WEIGHT_KEY not in node.meta or not node.name:
            continue
        dq = node.inputs[0].producer() if node.inputs[0] is not None else None
        q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue  # activation not statically quantized: nothing to switch
        found.append(_Switch(target, q.inputs[0], node.meta.get(BIAS_BEFORE_KEY)))
    return found


class KeepSensitiveFloatPass(ir.passes.InPlacePass):
    """Meet ``objective`` on the first ``samples`` calibration feeds with at most
    ``max_float_fraction`` of the quantized layers in float (``qcompiler.sensitivity``).
    ``candidates``: layers checked by ablation (at least the cap). ``decision`` holds the result.
    Idempotent: a model with no quantized target left to switch is not modified."""

    def __init__(self, objective: sensitivity.Objective, feeds: FeedSource, samples: int = 4,
                 max_float_fraction: float = 0.1, candidates: int = 16, threads: int | None = None,
                 progress: bool = True) -> None:
        super().__init__()
        self.objective, self.feeds, self.samples = objective, feeds, samples
        self.max_float_fraction, self.candidates = max_float_fraction, candidates
        self.threads, self.progress = threads, progress
        self.decision: sensitivity.Decision | None = None
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        switches = _switches(model)
        if not switches or DECISION_KEY in model.metadata_props:
            return ir.passes.PassResult(model, modified=False)
        feeds = list(itertools.islice(self.feeds(), self.samples))
        if not feeds:
            raise QCompileError("the accuracy target is measured on calibration data, which has no samples")
        board = _Switchboard(model, switches, self.threads)
        outputs = [o.name for o in model.graph.outputs][:1]
        everything = frozenset(s.name for s in switches)
        scorer = sensitivity.Scorer(self.objective, feeds, board.run(feeds, everything, outputs))
        layer_sqnr = board.layer_sqnr(feeds)
        say = (lambda text: print(f"  sensitivity: {text}", flush=True)) if self.progress else (lambda _: None)
        self.decision = sensitivity.choose_float_layers(
            layer_sqnr, lambda f: scorer.loss(board.run(feeds, f, outputs)), self.objective,
            cap=int(self.max_float_fraction * len(switches)), candidates=self.candidates, progress=say)
        chosen = set(self.decision.kept_float)
        for switch in switches:
            if switch.name in chosen:
                _to_float(model.graph, switch)
        model.metadata_props[DECISION_KEY] = json.dumps(self.decision.as_dict())
        self.summary = self.decision.summary()
        return ir.passes.PassResult(model, modified=bool(chosen))


def _to_float(graph: ir.Graph, switch: _Switch) -> None:
    node = switch.target.node
    node.replace_input_with(0, switch.x)
    node.replace_input_with(1, ir_utils.initializer(graph, f"{switch.name}.float_weight", switch.target.weight))
    if switch.bias is not None:
        bias_node, index, value = switch.bias
        bias_node.replace_input_with(index, value)
    for key in (TARGET_KEY, WEIGHT_KEY, BIAS_BEFORE_KEY):
        node.meta.pop(key, None)


class _Switchboard:
    """The model with a float/quantized switch per target, as ONNX Runtime sessions."""

    def __init__(self, model: ir.Model, switches: list[_Switch], threads: int | None) -> None:
        self.switches, self.threads = switches, threads
        self.proto = _switch_proto(model, switches)
        self.session = create_session(self.proto.SerializeToString(), threads=threads)

    def _flags(self, in_float: frozenset[str]) -> dict[str, np.ndarray]:
        return {s.flag: np.array(s.name in in_float) for s in self.switches}

    def run(self, feeds: list[dict], in_float: frozenset[str], outputs: list[str]) -> list[np.ndarray]:
        flags = self._flags(in_float)
        return [self.session.run(outputs, {**feed, **flags})[0] for feed in feeds]

    def layer_sqnr(self, feeds: list[dict]) -> dict[str, float]:
        """Each target's output against a float copy of it fed the same quantized-model input."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        pairs = _add_shadows(proto, self.switches)
        session = create_session(proto.SerializeToString(), threads=self.threads)
        stats = {name: ErrorStats() for name in pairs}
        names = [n for pair in pairs.values() for n in pair]
        for feed in feeds:
            values = dict(zip(names, session.run(names, {**feed, **self._flags(frozenset())})))
            for name, (quant, shadow) in pairs.items():
                stats[name].update(values[shadow], values[quant])
        return {name: s.sqnr_db for name, s in stats.items()}


def _switch_proto(model: ir.Model, switches: list[_Switch]) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    graph = proto.graph
    by_name = {s.name: s for s in switches}
    bias_at = {s.bias[0].name: s for s in switches if s.bias is not None}
    nodes = []
    for node in graph.node:
        switch = by_name.get(node.name)
        if switch is not None:
            weight_name = f"{switch.name}.switch_float_weight"
            graph.initializer.append(onnx.numpy_helper.from_array(switch.target.weight, weight_name))
            graph.input.append(onnx.helper.make_tensor_value_info(switch.flag, onnx.TensorProto.BOOL, []))
            act, weight = node.input[0], node.input[1]
            nodes.append(onnx.helper.make_node("Where", [switch.flag, switch.x.name, act], [f"{switch.name}.x_switch"]))
            nodes.append(onnx.helper.make_node("Where", [switch.flag, weight_name, weight], [f"{switch.name}.w_switch"]))
            node.input[0], node.input[1] = f"{switch.name}.x_switch", f"{switch.name}.w_switch"
        owner = bias_at.get(node.name)
        if owner is not None:
            _, index, before = owner.bias
            out = f"{owner.name}.b_switch"
            nodes.append(onnx.helper.make_node("Where", [owner.flag, before.name, node.input[index]], [out]))
            node.input[index] = out
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _add_shadows(proto: onnx.ModelProto, switches: list[_Switch]) -> dict[str, tuple[str, str]]:
    """Add a float copy of each target (reading ``x`` and the float weight); returns
    target → (its output, the copy's output), both made graph outputs."""
    graph = proto.graph
    pairs, nodes = {}, []
    by_name = {s.name: s for s in switches}
    for node in graph.node:
        nodes.append(node)
        switch = by_name.get(node.name)
        if switch is None:
            continue
        shadow = onnx.NodeProto()
        shadow.CopyFrom(node)
        shadow.name = f"{node.name}.shadow"
        shadow.input[0], shadow.input[1] = switch.x.name, f"{switch.name}.switch_float_weight"
        del shadow.output[:]
        shadow.output.append(f"{node.name}.shadow_out")
        nodes.append(shadow)
        pairs[switch.name] = (node.output[0], shadow.output[0])
    del graph.node[:]
    graph.node.extend(nodes)
    have = {o.name for o in graph.output}
    for quant, shadow in pairs.values():
        for name in (quant, shadow):
            if name not in have:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                have.add(name)
    return pairs
