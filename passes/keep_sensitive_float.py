"""Move the fewest, most sensitive static layers up to per-token activations or float, until the
model meets an accuracy target.

Runs on the QDQ model after every other quantization (embedding tables, the LM head), so what
it measures is the model as it will run, and before clean-up: each target ``t`` then reads
``DQ(Q(x_t))`` and ``DQ(W_t^q)`` (int8, or E4M3 from ``passes.quantize_fp8``), and its float
weight is still known (``QuantTarget.weight``). The float model's outputs it measures against
were kept before any of that (``passes.float_reference``). To measure many choices cheaply the
pass serializes one *switchboard* model: for every target boolean graph inputs ``f_t`` (float)
and ``p_t`` (per token; MatMul and Gemm only, when a per-token scheme is given) and ::

    x'_t = Where(f_t, x_t, Where(p_t, T(x_t), DQ(Q(x_t))))     W'_t = Where(f_t, W_t, DQ(W_t^q))
    b'_t = Where(f_t, b_t, b_t − E[ΔW·x])  (the bias before bias correction, if corrected)

where ``T`` is the per-token quantization of ``passes.dynamic_activations`` simulated in float
(``per-token``: ``m = min_k x``, ``s = max(max_k x − m, ε)/255``, ``T(x) = s·round((x − m)/s) + m``
per row; ``per-token-sym``: ``s = max(max_k |x|, ε)/127``, ``T(x) = s·round(x/s)``). One ONNX
Runtime session then runs the model with any choice (the quantized paths are simulated in float,
as the QDQ reference is). A second model adds, per target, a float copy of the op fed the
quantized model's own activation: the layer's own SQNR. The search is
``qcompiler.sensitivity.choose_precisions``. Layers it keeps in float are rewired in the real
model (float activation, float weight, original bias) and clean-up drops their Q/DQ; layers it
moves to per-token are lowered by ``LowerDynamicActivationsPass`` with the same int8 weight.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir

from passes.bias_correction import BIAS_BEFORE_KEY
from passes.dynamic_activations import LowerDynamicActivationsPass
from passes.float_reference import FloatReferencePass
from passes.insert_static_qdq import ACTIVATION_KEY
from passes.quantize_fp8 import FP8_WEIGHT_KEY
from passes.quantize_weights import WEIGHT_KEY
from passes.select_targets import TARGET_KEY, QuantTarget
from qcompiler import ir_utils, sensitivity
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

    @property
    def per_token_flag(self) -> str:
        return f"{self.name}.per_token"

    @property
    def can_run_per_token(self) -> bool:
        return self.target.op_type in ("MatMul", "Gemm")


def _switches(model: ir.Model) -> list[_Switch]:
    found = []
    for node in model.graph:
        target = node.meta.get(TARGET_KEY)
        if target is None or not (WEIGHT_KEY in node.meta or FP8_WEIGHT_KEY in node.meta) or not node.name:
            continue
        dq = node.inputs[0].producer() if node.inputs[0] is not None else None
        q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue  # activation not statically quantized: nothing to switch
        found.append(_Switch(target, q.inputs[0], node.meta.get(BIAS_BEFORE_KEY)))
    return found


class KeepSensitiveFloatPass(ir.passes.InPlacePass):
    """Meet ``objective`` on the samples ``reference`` ran the float model on (the pipeline
    holds them apart from the ranges; ``qcompiler.calibration.split_feeds``), against the float
    outputs it kept, with at most ``max_float_fraction`` of the quantized layers in float
    (``qcompiler.sensitivity``).
    ``candidates``: layers checked by ablation (at least the cap). ``per_token_scheme``
    (``per-token``, ``per-token-sym`` or None): the rung below float, if any. ``decision`` holds
    the result. ``margin``: standard errors of the per-sample mean added to every loss
    (``Scorer.loss``). Idempotent: a model with no quantized target left to switch is not
    modified."""

    def __init__(self, objective: sensitivity.Objective, reference: FloatReferencePass,
                 max_float_fraction: float = 0.1, candidates: int = 16, threads: int | None = None,
                 progress: bool = True, per_token_scheme: str | None = None, margin: float = 0.0) -> None:
        super().__init__()
        self.objective, self.reference, self.margin = objective, reference, margin
        self.per_token_scheme = per_token_scheme
        self.max_float_fraction, self.candidates = max_float_fraction, candidates
        self.threads, self.progress = threads, progress
        self.decision: sensitivity.Decision | None = None
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        switches = _switches(model)
        if not switches or DECISION_KEY in model.metadata_props:
            return ir.passes.PassResult(model, modified=False)
        if self.reference.outputs is None:
            raise ValueError("FloatReferencePass must run before KeepSensitiveFloatPass")
        feeds = self.reference.inputs
        if not feeds:
            raise QCompileError("the accuracy target is measured on calibration data, which has no samples")
        board = _Switchboard(model, switches, self.threads, self.per_token_scheme)
        outputs = [o.name for o in model.graph.outputs][:1]
        scorer = sensitivity.Scorer(self.objective, feeds, self.reference.outputs)
        layer_sqnr = board.layer_sqnr(feeds)
        say = (lambda text: print(f"  sensitivity: {text}", flush=True)) if self.progress else (lambda _: None)
        self.decision = sensitivity.choose_precisions(
            layer_sqnr, lambda f, p: scorer.loss(board.run(feeds, f, p, outputs), self.margin), self.objective,
            cap=int(self.max_float_fraction * len(switches)), candidates=self.candidates,
            per_token=[s.name for s in board.per_token_switches], progress=say, margin=self.margin)
        in_float, per_token = set(self.decision.kept_float), set(self.decision.per_token)
        for switch in switches:
            if switch.name in in_float:
                _to_float(model.graph, switch)
        if per_token:
            self._to_per_token(model, [s for s in switches if s.name in per_token])
        model.metadata_props[DECISION_KEY] = json.dumps(self.decision.as_dict())
        self.summary = self.decision.summary()
        return ir.passes.PassResult(model, modified=bool(in_float or per_token))

    def _to_per_token(self, model: ir.Model, chosen: list[_Switch]) -> None:
        """Lower ``chosen`` (graph order) with run-time per-token activation scales; their
        static Q/DQ lose this reader (clean-up drops them when no other is left)."""
        for switch in chosen:
            switch.target.node.meta.pop(ACTIVATION_KEY, None)
        lowering = LowerDynamicActivationsPass(self.per_token_scheme)
        lowering.lower(model, [dataclasses.replace(s.target, activation=s.x) for s in chosen])


def _to_float(graph: ir.Graph, switch: _Switch) -> None:
    node = switch.target.node
    node.replace_input_with(0, switch.x)
    node.replace_input_with(1, ir_utils.initializer(graph, f"{switch.name}.float_weight", switch.target.weight))
    if switch.bias is not None:
        bias_node, index, value = switch.bias
        bias_node.replace_input_with(index, value)
    for key in (TARGET_KEY, WEIGHT_KEY, FP8_WEIGHT_KEY, BIAS_BEFORE_KEY):
        node.meta.pop(key, None)


class _Switchboard:
    """The model with a float/quantized switch per target, as ONNX Runtime sessions."""

    def __init__(self, model: ir.Model, switches: list[_Switch], threads: int | None,
                 per_token_scheme: str | None = None) -> None:
        self.switches, self.threads = switches, threads
        self.per_token_switches = [s for s in switches if per_token_scheme and s.can_run_per_token]
        opset = model.opset_imports.get("", 13)
        self.proto = _switch_proto(model, switches, {s.name for s in self.per_token_switches}, per_token_scheme, opset)
        self.session = create_session(self.proto.SerializeToString(), threads=threads)

    def _flags(self, in_float: frozenset[str], per_token: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        flags = {s.flag: np.array(s.name in in_float) for s in self.switches}
        flags.update({s.per_token_flag: np.array(s.name in per_token) for s in self.per_token_switches})
        return flags

    def run(self, feeds: list[dict], in_float: frozenset[str], per_token: frozenset[str],
            outputs: list[str]) -> list[np.ndarray]:
        flags = self._flags(in_float, per_token)
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


def _switch_proto(model: ir.Model, switches: list[_Switch], per_token: set[str], scheme: str | None,
                  opset: int) -> onnx.ModelProto:
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
            if switch.name in per_token:
                graph.input.append(onnx.helper.make_tensor_value_info(switch.per_token_flag, onnx.TensorProto.BOOL, []))
                simulated = _per_token_nodes(nodes, graph, switch.x.name, switch.name, scheme, opset)
                nodes.append(onnx.helper.make_node("Where", [switch.per_token_flag, simulated, act],
                                                   [f"{switch.name}.x_rung"]))
                act = f"{switch.name}.x_rung"
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


def _per_token_nodes(nodes: list, graph: onnx.GraphProto, x: str, stem: str, scheme: str, opset: int) -> str:
    """Append the float simulation ``T(x)`` of ``scheme`` (module docstring); its name."""
    def name(suffix: str) -> str:
        return f"{stem}.per_token_{suffix}"

    def const(suffix: str, value) -> str:
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name(suffix)))
        return name(suffix)

    def op(op_type: str, inputs: list[str], suffix: str, **attributes) -> str:
        nodes.append(onnx.helper.make_node(op_type, inputs, [name(suffix)], **attributes))
        return name(suffix)

    def row(op_type: str, value: str, suffix: str) -> str:
        if opset >= 18:
            return op(op_type, [value, const("axes", np.array([-1], np.int64))], suffix, keepdims=1)
        return op(op_type, [value], suffix, axes=[-1], keepdims=1)

    epsilon = const("epsilon", np.float32(1e-8))
    if scheme == "per-token-sym":
        amax = op("Max", [row("ReduceMax", op("Abs", [x], "abs"), "absmax"), epsilon], "absmax_safe")
        scale = op("Div", [amax, const("qmax", np.float32(127.0))], "scale")
        return op("Mul", [op("Round", [op("Div", [x, scale], "scaled")], "rounded"), scale], "out")
    low = row("ReduceMin", x, "min")
    span = op("Max", [op("Sub", [row("ReduceMax", x, "max"), low], "span"), epsilon], "span_safe")
    scale = op("Div", [span, const("levels", np.float32(255.0))], "scale")
    rounded = op("Round", [op("Div", [op("Sub", [x, low], "shifted"), scale], "scaled")], "rounded")
    return op("Add", [op("Mul", [rounded, scale], "unscaled"), low], "out")


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
