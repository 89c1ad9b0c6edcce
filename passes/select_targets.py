"""Decide which weighted ops are quantized (annotation, before any rewrite).

A *target* is a MatMul, Gemm or Conv whose weight is constant — an initializer, a Constant, or
either one seen through view ops (``Transpose``/``Reshape``…: the LM head tied to the embedding
table is ``MatMul(h, Transpose(E))``). For each target we record the activation input, the
weight as the op sees it and the weight's output-channel axis:

* ``MatMul(X, W)``, ``W: [K, N]`` → channel axis 1;
* ``Gemm(X, W)``: ``W: [K, N]`` → axis 1, or ``W: [N, K]`` with ``transB=1`` → axis 0;
* ``Conv(X, W)``, ``W: [M, C/g, kh, kw]`` → axis 0.

The record lives in ``node.meta[TARGET_KEY]`` (in memory only) for the passes that follow.
Activation×activation MatMuls (attention scores) are skipped unless asked for.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler import ir_utils

TARGET_KEY = "qcompile.target"


@dataclasses.dataclass
class QuantTarget:
    """A weighted op chosen for quantization."""

    node: ir.Node
    activation: ir.Value
    weight: np.ndarray  # the weight exactly as the op consumes it
    channel_axis: int

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def input_channels(self) -> int:
        """Channels of the activation the weight contracts with (K; ``C`` for a Conv)."""
        if self.op_type == "Conv":
            return self.node.attributes.get_int("group", 1) * self.weight.shape[1]
        return self.weight.shape[1 - self.channel_axis]


def targets(model: ir.Model) -> list[QuantTarget]:
    """The annotated targets in graph order."""
    return [n.meta[TARGET_KEY] for n in model.graph if TARGET_KEY in n.meta]


def find_target(node: ir.Node, op_types: tuple[str, ...]) -> QuantTarget | None:
    """The target record for ``node``, or None when it is not a quantizable weighted op."""
    if node.domain != "" or node.op_type not in op_types or len(node.inputs) < 2:
        return None
    activation = node.inputs[0]
    if activation is None or ir_utils.constant_array(activation) is not None:
        return None
    weight = ir_utils.constant_through_views(node.inputs[1])
    if weight is None or weight.dtype != np.float32:
        return None  # float16/bfloat16 models are not handled yet: leave them in float
    axis = _channel_axis(node, weight)
    if axis is None:
        return None
    return QuantTarget(node, activation, weight, axis)


def _channel_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    if node.op_type == "MatMul":
        return 1 if weight.ndim == 2 else None
    if node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        trans_a = node.attributes.get_int("transA", 0)
        return None if trans_a or weight.ndim != 2 else (0 if trans_b else 1)
    if node.op_type == "Conv":
        return 0 if weight.ndim >= 3 else None
    return None


class SelectTargetsPass(ir.passes.InPlacePass):
    """Annotate every quantizable weighted op with a ``QuantTarget``.

    ``op_types``: op types to consider. ``exclude``: node names kept in float.
    Idempotent: an already annotated node is left as is, and ``modified`` is true only when a
    new node was annotated.
    """

    def __init__(self, op_types: tuple[str, ...], exclude: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.op_types = op_types
        self.exclude = frozenset(exclude)
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        added: collections.Counter = collections.Counter()
        for node in model.graph:
            if TARGET_KEY in node.meta or node.name in self.exclude:
                continue
            target = find_target(node, self.op_types)
            if target is not None:
                node.meta[TARGET_KEY] = target
                added[node.op_type] += 1
        self.summary = "selected " + (
            ", ".join(f"{n} {op}" for op, n in sorted(added.items())) or "nothing new"
        )
        return ir.passes.PassResult(model, modified=bool(added))
