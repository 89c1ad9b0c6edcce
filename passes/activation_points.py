"""Where static activation Q/DQ pairs go (placement rules; no graph change here).

A *point* is one input of one node that reads a quantized activation. Three rules:

1. **weighted ops** — the activation input of every weight-quantized target (always);
2. **residual adds** — both inputs of an ``Add`` of two activations one of which comes from a
   target (``conv → add`` / ``matmul → add bias → add``): TensorRT's rule. With
   ``placement="fusable"`` (ONNX Runtime CPU) only where the sum is itself read by quantized
   points, so that ``DQ, DQ → Add → Q`` becomes one integer ``QLinearAdd``; a residual stream
   that feeds float LayerNorms (transformers) stays float — quantizing it would add error and
   win nothing;
3. **pooling** — the input of a global average pooling (``GlobalAveragePool`` or its
   ``ReduceMean`` form) whose output (through shape-only ops)
   is read only by quantized points (the CNN classifier head), so that the pooling runs on
   integers and the last conv requantizes into it.

``placement="all"`` is TensorRT's placement (used by ``--target qdq``): every residual add.
The calibration pass observes exactly these values; the Q/DQ pass inserts exactly these pairs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from passes.select_targets import TARGET_KEY
from qcompiler import ir_utils

PLACEMENTS = ("fusable", "all", "weighted")
SHAPE_ONLY_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
POOLING_OPS = ("GlobalAveragePool", "ReduceMean")


def is_global_pool(node: ir.Node) -> bool:
    """``GlobalAveragePool``, or a ``ReduceMean`` over the two spatial axes of an NCHW tensor
    with ``keepdims=1`` (how exporters often write it)."""
    if node.domain != "" or node.op_type not in POOLING_OPS:
        return False
    if node.op_type == "GlobalAveragePool":
        return True
    axes = ir_utils.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None:
        attr = node.attributes.get("axes")
        axes = None if attr is None else attr.as_ints()
    shape = node.inputs[0].shape
    if axes is None or shape is None or len(shape) != 4:
        return False
    return node.attributes.get_int("keepdims", 1) == 1 and sorted(
        int(a) % 4 for a in np.asarray(axes).reshape(-1)
    ) == [2, 3]


@dataclasses.dataclass(frozen=True)
class Point:
    """Input ``index`` of ``node`` reads a quantized activation; ``rule`` says why."""

    node: ir.Node
    index: int
    rule: str

    @property
    def value(self) -> ir.Value:
        return self.node.inputs[self.index]


def _is_activation(value: ir.Value | None) -> bool:
    return value is not None and ir_utils.constant_array(value) is None


def _from_target(value: ir.Value) -> bool:
    """``value`` is a target's output, possibly after an ``Add`` of a constant bias."""
    node = value.producer()
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        a, b = node.inputs
        if _is_activation(a) and not _is_activation(b):
            node = a.producer()
        elif _is_activation(b) and not _is_activation(a):
            node = b.producer()
    return node is not None and TARGET_KEY in node.meta


def is_residual_add(node: ir.Node) -> bool:
    """An ``Add`` of two activations, at least one produced by a target."""
    if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    return _is_activation(a) and _is_activation(b) and (_from_target(a) or _from_target(b))


def _through_shape_ops(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """The readers of ``value``, looking through shape-only ops."""
    readers = []
    for node, index in value.uses():
        if node.op_type in SHAPE_ONLY_OPS and index == 0 and node.domain == "":
            readers += _through_shape_ops(node.outputs[0])
        else:
            readers.append((node, index))
    return readers


def points(model: ir.Model, placement: str = "fusable") -> list[Point]:
    """Every point of ``model`` in graph order (targets must be weight-quantized or annotated)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}")
    graph = model.graph
    found: dict[tuple[int, int], Point] = {}
    for node in graph:
        if TARGET_KEY in node.meta:
            found[(id(node), 0)] = Point(node, 0, "weighted op")
    adds = [n for n in graph if is_residual_add(n)] if placement != "weighted" else []
    pools = [n for n in graph if is_global_pool(n)]

    def quantized_readers(value: ir.Value, pending: set[int]) -> bool:
        readers = _through_shape_ops(value)
        return bool(readers) and all(
            (id(n), i) in found or id(n) in pending for n, i in readers
        )

    # Fixed point: an add (or pool) qualifies once all its output's readers are points or
    # pending candidates (chains of residual adds qualify together).
    candidates = {id(n): n for n in adds + pools}
    changed = True
    while changed:
        changed = False
        for key, node in list(candidates.items()):
            ok = placement == "all" and node.op_type == "Add"
            ok = ok or quantized_readers(node.outputs[0], set(candidates))
            if not ok:
                del candidates[key]
                changed = True
    for node in candidates.values():
        rule = "residual add" if node.op_type == "Add" else "pooling"
        for index in range(len(node.inputs) if node.op_type == "Add" else 1):
            found[(id(node), index)] = Point(node, index, rule)
    order = {id(n): i for i, n in enumerate(graph)}
    return sorted(found.values(), key=lambda p: (order[id(p.node)], p.index))
