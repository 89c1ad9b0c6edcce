"""``--verify``: check the lowering against the QDQ model it came from, and both against float.

A lowering (QDQ → integer kernels) must not add error beyond rounding. Checked op by op: every
integer op of the lowered model is run alone on the QDQ model's own tensors (the quantized
inputs it reads, by name) and its output compared with the QDQ model's tensor of the same
name. The bound: one quantization step — 1 (an 8-bit output differs by at most one integer
level: a rounding tie may fall either way) or, for a float output, one 8-bit step of its range
``(max − min) / 255``. Comparing only end to end would not do: one-level differences at ties
propagate through a deep network (MobileNetV2's logits move by ~0.5 step on average), so the
end-to-end figures are reported — error against float for the QDQ and the lowered model — but
not judged.

The QDQ model runs with ONNX Runtime's graph optimisations off, so it computes exactly what its
Q/DQ nodes state (DequantizeLinear → float op → QuantizeLinear), independent of any fusion.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler import quant_math as qm
from qcompiler.calibration import Feed
from qcompiler.errors import VerificationError
from runtime.session import create_session

LEVELS = 255
# The ops a lowering emits whose outputs are checked op by op.
INTEGER_OPS = (
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool",
    "MatMulIntegerToFloat", "MatMulInteger", "QGemm",
)


@dataclasses.dataclass
class OpCheck:
    """One op type's worst disagreement with the QDQ model (op by op)."""

    op_type: str
    count: int
    max_error: float  # in steps: integer levels (8-bit output) or (max − min)/255 (float)
    bound: float
    unchecked: int = 0  # ops whose inputs have no counterpart in the QDQ model

    @property
    def ok(self) -> bool:
        return self.max_error <= self.bound

    def line(self) -> str:
        skipped = f", {self.unchecked} without QDQ counterpart" if self.unchecked else ""
        return (f"{self.count} {self.op_type}: max |Δ| vs QDQ {self.max_error:.3g} steps "
                f"({'≤' if self.ok else '>'} {self.bound:.3g}){skipped}")


@dataclasses.dataclass
class OutputCheck:
    """One model output, end to end (reported, not judged)."""

    name: str
    qdq_sqnr_db: float  # QDQ model against float
    lowered_sqnr_db: float  # lowered model against float
    max_vs_qdq: float  # max |lowered − QDQ|
    step: float  # (max − min) / 255 of the QDQ output

    def line(self) -> str:
        return (f"{self.name}: SQNR vs float QDQ {self.qdq_sqnr_db:.1f} dB, lowered "
                f"{self.lowered_sqnr_db:.1f} dB; max |lowered − QDQ| {self.max_vs_qdq:.3g} "
                f"({self.max_vs_qdq / max(self.step, 1e-30):.2f} steps)")


@dataclasses.dataclass
class Verification:
    ops: list[OpCheck]
    outputs: list[OutputCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.ops)

    def lines(self) -> list[str]:
        head = [] if self.ops else [
            "no separate lowering to check (QDQ output, or run-time scales lowered as they are "
            "inserted): end-to-end figures only"]
        return head + [c.line() for c in self.ops] + [c.line() for c in self.outputs]


def snapshot(model: ir.Model) -> bytes:
    """The model as serialized bytes (the QDQ stage, kept for ``check``)."""
    return ir.serde.serialize_model(model).SerializeToString()


def _run(model: bytes | Path, feeds: list[Feed], optimize: bool = True, names=None):
    session = create_session(model, optimize=optimize)
    names = names or [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    runs = [session.run(names, {k: v for k, v in f.items() if k in wanted}) for f in feeds]
    return [dict(zip(names, r)) for r in runs]


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> bytes:
    """``proto`` with ``names`` added as graph outputs (element type left to inference)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model.SerializeToString()


def _single_op(node: onnx.NodeProto, lowered: onnx.ModelProto, sample: Feed) -> bytes:
    """A model of ``node`` alone: its constant inputs as initializers, the rest as inputs
    (typed after ``sample``)."""
    inits = {i.name: i for i in lowered.graph.initializer}
    graph = onnx.helper.make_graph(
        [node], "op",
        [onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(sample[n].dtype), None)
         for n in node.input if n and n not in inits],
        [onnx.ValueInfoProto(name=n) for n in node.output],
        [inits[n] for n in node.input if n in inits],
    )
    model = onnx.helper.make_model(graph, opset_imports=lowered.opset_import)
    model.ir_version = lowered.ir_version
    return model.SerializeToString()


def _checkable(qdq: onnx.ModelProto, lowered: onnx.ModelProto):
    """(integer ops whose tensors all exist in the QDQ model, count of the others by type)."""
    known = {o for n in qdq.graph.node for o in n.output} | {i.name for i in qdq.graph.input}
    inits = {i.name for i in lowered.graph.initializer}
    checkable, unchecked = [], collections.Counter()
    for node in (n for n in lowered.graph.node if n.op_type in INTEGER_OPS):
        needed = [n for n in node.input if n and n not in inits] + [node.output[0]]
        if all(n in known for n in needed):
            checkable.append(node)
        else:
            unchecked.update([node.op_type])
    return checkable, unchecked


def _step_error(want: np.ndarray, have: np.ndarray) -> float:
    """max |have − want| in steps: integer levels, or (max − min)/255 of a float tensor."""
    if want.dtype.kind in "ui":
        return float(np.abs(have.astype(np.int64) - want.astype(np.int64)).max())
    step = max(float(want.max() - want.min()) / LEVELS, 1e-30)
    return float(np.abs(have - want).max()) / step


def check_ops(lowered: onnx.ModelProto, checkable, unchecked, reference) -> list[OpCheck]:
    """Run each checkable integer op alone on the QDQ model's tensors (``reference``: one dict
    of tensors per sample) and keep each op type's worst error."""
    worst: dict[str, list[float]] = {}
    for node in checkable:
        got = _run(_single_op(node, lowered, reference[0]), reference, optimize=False)
        error = max(_step_error(r[node.output[0]], g[node.output[0]]) for r, g in zip(reference, got))
        entry = worst.setdefault(node.op_type, [0, 0.0])
        entry[0] += 1
        entry[1] = max(entry[1], error)
    checks = [OpCheck(op, int(n), err, 1.0, unchecked.pop(op, 0))
              for op, (n, err) in sorted(worst.items())]
    return checks + [OpCheck(op, 0, 0.0, 1.0, n) for op, n in sorted(unchecked.items())]


def check_outputs(float_runs, qdq_runs, lowered_runs) -> list[OutputCheck]:
    """End-to-end figures per model output."""
    checks = []
    for name in lowered_runs[0]:
        f, q, lw = (np.concatenate([r[name].reshape(-1) for r in runs]).astype(np.float64)
                    for runs in (float_runs, qdq_runs, lowered_runs))
        checks.append(OutputCheck(name, qm.sqnr_db(f, q), qm.sqnr_db(f, lw),
                                  float(np.abs(lw - q).max()), float(q.max() - q.min()) / LEVELS))
    return checks


def check(float_model: Path, qdq: bytes | None, lowered: Path, feeds: list[Feed]) -> Verification:
    """Op-by-op checks of the lowering (none without a QDQ stage) and end-to-end figures.
    Each of the three models runs once over ``feeds``; the QDQ run also exposes the tensors
    the op-by-op checks read."""
    lowered_runs = _run(lowered, feeds)
    float_runs = _run(float_model, feeds)
    if qdq is None:
        return Verification([], check_outputs(float_runs, lowered_runs, lowered_runs))
    lowered_proto, qdq_proto = onnx.load(lowered), onnx.load_from_string(qdq)
    checkable, unchecked = _checkable(qdq_proto, lowered_proto)
    inits = {i.name for i in lowered_proto.graph.initializer}
    outputs = [o.name for o in qdq_proto.graph.output]
    names = outputs + sorted(
        {n for node in checkable for n in (*node.input, node.output[0]) if n and n not in inits}
        - set(outputs))
    qdq_runs = _run(_with_outputs(qdq_proto, names), feeds, optimize=False, names=names)
    ops = check_ops(lowered_proto, checkable, unchecked, qdq_runs)
    return Verification(ops, check_outputs(float_runs, qdq_runs, lowered_runs))


def require(result: Verification | None) -> None:
    """Raise ``VerificationError`` (exit code 1) naming the op types over their bound."""
    if result is None or result.ok:
        return
    bad = [c for c in result.ops if not c.ok]
    raise VerificationError(
        "the lowering moved outputs beyond one quantization step: "
        + "; ".join(f"{c.op_type} max |Δ| {c.max_error:.3g} > {c.bound:.3g}" for c in bad)
    )
