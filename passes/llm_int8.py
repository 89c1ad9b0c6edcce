"""LLM.int8() (Dettmers et al., 2022): int8 vector-wise matmul plus a few outlier input channels
in float, chosen per layer from calibration (``--int8-mixed``).

For ``Y = X W`` (``W: [K, N]``) and a set ``O`` of outlier input channels::

    X' = X with the channels of O zeroed         s_x[m] = max(max_k |X'[m, k]|, ε) / 127
    s_w[n] = max_{k∉O} |W[k, n]| / 127            W^q = round(W / s_w), rows of O zero   (int8)
    Y[m, n] = s_x[m] s_w[n] Σ_k round(X'[m, k] / s_x[m]) W^q[k, n]  +  Σ_{i∈O} X[m, i] W16[i, n]

``W16`` is ``W``'s outlier rows rounded to fp16 (the paper multiplies them in fp16).

**Choosing O.** The paper's fixed threshold (|x| ≥ 6) marks 19% of SmolLM2's down_proj input
channels: no longer "a few". Instead, per layer, channels are ranked by calibrated ``max|x|``
and O is the smallest top-ranked set whose output error on calibration rows,
``‖Y_mixed − Y‖ / ‖Y‖``, is at most ``error_target``, capped at ``max_fraction`` of K (the
capped set when nothing smaller meets the target). The error falls as channels are added, so
the size is found by bisection (``choose_outliers``).

**Emission.** ``custom_op=True`` (``--target ort-cuda`` with the library built): one
``qcompile.MixedInt8MatMul`` (``runtime.custom_ops``). Otherwise standard graph pieces, the
same numbers: ``Gather(X, O) · W16`` (fp32 MatMul) ``+`` ``X ⊙ mask`` quantized per row
(``round(X'/s_x) + 128`` in uint8, like per-token-sym) through ``com.microsoft.MatMulIntegerToFloat``
(``ort-cpu``) or ONNX ``MatMulInteger`` + ``Cast`` + scales (``qdq``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from passes.select_targets import QuantTarget, targets
from qcompiler import ir_utils
from qcompiler import quant_math as qm
from qcompiler.calibration import FeedSource, collect_stats
from qcompiler.config import CalibrationConfig
from qcompiler.errors import QCompileError
from runtime import custom_ops

MS = "com.microsoft"
ROW_EPSILON = np.float32(1e-8)
EMITTED_KEY = "qcompile.llm_int8"
METADATA_KEY = "qcompile.llm_int8"
ZERO_POINT = 128


# --- math (numpy) ----------------------------------------------------------------------------


def quantize_weight(w: np.ndarray, outliers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(W^q [K, N] int8 with outlier rows zero, s_w [N], W16 [|O|, N] float16)``."""
    rest = w.astype(np.float32).copy()
    rest[outliers] = 0.0
    scale = qm.symmetric_scale(np.abs(rest).max(axis=0))
    q = qm.quantize(rest, scale[None, :], 0, qm.INT8)
    return q, scale, w[outliers].astype(np.float16)


def quantize_rows(x: np.ndarray, outliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(round(X'/s_x) int8, s_x [..., 1])`` of ``X`` with the outlier channels zeroed."""
    rest = x.astype(np.float32).copy()
    rest[..., outliers] = 0.0
    scale = np.maximum(np.abs(rest).max(axis=-1, keepdims=True), ROW_EPSILON) / np.float32(127.0)
    return np.clip(np.rint(rest / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def mixed_matmul(x: np.ndarray, w: np.ndarray, outliers: np.ndarray) -> np.ndarray:
    """The LLM.int8() product (module docstring), float32 (for choosing O)."""
    q, w_scale, w16 = quantize_weight(w, outliers)
    xq, x_scale = quantize_rows(x, outliers)
    y = (xq.astype(np.float32) @ q.astype(np.float32)) * x_scale * w_scale
    return y + x[..., outliers].astype(np.float32) @ w16.astype(np.float32)


def choose_outliers(x: np.ndarray, w: np.ndarray, channel_absmax: np.ndarray, error_target: float,
                    max_count: int) -> tuple[np.ndarray, float]:
    """``(O, error)``: the smallest top-``max|x|`` set with ``‖Y_mixed − Y‖/‖Y‖ ≤ error_target``
    on the rows ``x``, at most ``max_count`` channels (module docstring)."""
    order = np.argsort(-channel_absmax, kind="stable")
    y = x.astype(np.float64) @ w.astype(np.float64)
    norm = max(float(np.linalg.norm(y)), 1e-30)
    errors: dict[int, float] = {}

    def error(count: int) -> float:
        if count not in errors:
            outliers = np.sort(order[:count])
            errors[count] = float(np.linalg.norm(mixed_matmul(x, w, outliers) - y)) / norm
        return errors[count]

    if error(0) <= error_target or max_count == 0:
        return np.zeros(0, np.int64), error(0)
    if error(max_count) > error_target:
        return np.sort(order[:max_count]).astype(np.int64), error(max_count)
    lo, hi = 0, max_count  # error(lo) > target >= error(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if error(mid) <= error_target else (mid, hi)
    return np.sort(order[:hi]).astype(np.int64), error(hi)


# --- emission --------------------------------------------------------------------------------


def emit_custom_op(graph: ir.Graph, node: ir.Node, w: np.ndarray, outliers: np.ndarray) -> ir.Value:
    q, w_scale, w16 = quantize_weight(w, outliers)
    b = ir_utils.NodeBuilder(graph, node, node.name or node.outputs[0].name or "matmul")
    inputs = [node.inputs[0], b.const("weight_q", np.ascontiguousarray(q.T)),
              b.const("weight_scale", w_scale), b.const("outlier_index", outliers.astype(np.int64)),
              b.const("weight_outlier", w16.reshape(len(outliers), w.shape[1]))]
    return b.op("MixedInt8MatMul", inputs, "mixed_int8_matmul", domain=custom_ops.DOMAIN)


def emit_graph(graph: ir.Graph, node: ir.Node, w: np.ndarray, outliers: np.ndarray, opset: int,
               integer_to_float: bool) -> ir.Value:
    """Standard pieces (module docstring); ``integer_to_float``: ORT's MatMulIntegerToFloat."""
    q, w_scale, w16 = quantize_weight(w, outliers)
    b = ir_utils.NodeBuilder(graph, node, node.name or node.outputs[0].name or "matmul")
    x = node.inputs[0]
    rest = x
    if len(outliers):
        mask = np.ones(w.shape[0], np.float32)
        mask[outliers] = 0.0
        rest = b.op("Mul", [x, b.const("inlier_mask", mask)], "inliers")
    if opset >= 18:
        amax = b.op("ReduceMax", [b.op("Abs", [rest], "abs"), b.const("axes", np.array([-1], np.int64))],
                    "row_absmax", keepdims=1)
    else:
        amax = b.op("ReduceMax", [b.op("Abs", [rest], "abs")], "row_absmax", axes=[-1], keepdims=1)
    amax = b.op("Max", [amax, b.const("epsilon", ROW_EPSILON)], "row_absmax_safe")
    x_scale = b.op("Div", [amax, b.const("qmax", np.float32(127.0))], "row_scale")
    zero = b.const("zero_point", np.uint8(ZERO_POINT))
    xq = b.op("QuantizeLinear", [b.op("Div", [rest, x_scale], "scaled"), b.const("unit_scale", np.float32(1.0)), zero],
              "quantize")
    wq = b.const("weight_q", np.ascontiguousarray(q))
    if integer_to_float:  # s_w · Σ (x^q − 128) W^q = s_w · Σ x^q W^q − 128 · s_w · ΣW^q (the bias)
        fold = (-ZERO_POINT * w_scale.astype(np.float64) * q.astype(np.float64).sum(axis=0)).astype(np.float32)
        y = b.op("MatMulIntegerToFloat", [xq, wq, b.const("unit", np.float32(1.0)), b.const("weight_scale", w_scale),
                                          None, None, b.const("zero_fold", fold)], "matmul_integer", domain=MS)
    else:
        acc = b.op("MatMulInteger", [xq, wq, zero, b.const("weight_zero", np.int8(0))], "matmul_integer")
        y = b.op("Mul", [b.op("Cast", [acc], "accumulator", to=ir.DataType.FLOAT), b.const("weight_scale", w_scale)],
                 "weight_rescale")
    y = b.op("Mul", [y, x_scale], "row_rescale")
    if len(outliers):
        xo = b.op("Gather", [x, b.const("outlier_index", outliers.astype(np.int64))], "outlier_columns", axis=-1)
        w_out = b.const("weight_outlier", w16.astype(np.float32).reshape(len(outliers), w.shape[1]))
        y = b.op("Add", [y, b.op("MatMul", [xo, w_out], "outlier_matmul")], "add_outliers")
    return y


class LLMInt8Pass(ir.passes.InPlacePass):
    """LLM.int8() on every selected MatMul (module docstring).

    ``feeds``: calibration data (required: the outlier sets are measured). ``error_target``:
    the relative output error a layer's outlier set must reach; ``max_fraction``: the cap on
    ``|O| / K``; ``rows``: calibration rows kept per activation to measure the error.
    ``custom_op``: emit ``qcompile.MixedInt8MatMul``; else the graph form, with
    ``integer_to_float`` choosing ORT's MatMulIntegerToFloat over ONNX MatMulInteger.
    After a run ``decisions`` maps each layer to ``{"outliers", "K", "error"}``
    (also in the model's metadata, ``qcompile.llm_int8``).
    """

    def __init__(self, feeds: FeedSource | None, error_target: float = 0.01, max_fraction: float = 0.02,
                 custom_op: bool = False, integer_to_float: bool = True,
                 calibration: CalibrationConfig = CalibrationConfig(max_samples=16), rows: int = 512,
                 progress: bool = True) -> None:
        super().__init__()
        self.feeds, self.error_target, self.max_fraction = feeds, error_target, max_fraction
        self.custom_op, self.integer_to_float = custom_op, integer_to_float
        self.calibration, self.rows, self.progress = calibration, rows, progress
        self.decisions: dict[str, dict] = {}
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        todo = [t for t in targets(model) if t.op_type == "MatMul" and EMITTED_KEY not in t.node.meta
                and t.weight.ndim == 2]
        if not todo:
            self.summary = "nothing to do"
            return ir.passes.PassResult(model, modified=False)
        if self.feeds is None:
            raise QCompileError("--int8-mixed picks outlier channels from calibration: pass --calib-data or --calib-text")
        activations = list({id(t.activation): t.activation for t in todo}.values())
        stats = collect_stats(model, activations, self.feeds(), mask_padding=self.calibration.mask_padding,
                              max_samples=self.calibration.max_samples or 16, progress=self.progress,
                              keep_rows=self.rows, histogram=False)
        opset = model.opset_imports.get("", 13)
        for target in todo:
            self._lower(model.graph, target, stats[target.activation.name], opset)
        if self.custom_op:
            model.opset_imports.setdefault(custom_ops.DOMAIN, 1)
        elif self.integer_to_float:
            model.opset_imports.setdefault(MS, 1)
        common.RemoveUnusedNodesPass()(model)  # the float weights (and a tied head's Transpose)
        model.metadata_props[METADATA_KEY] = json.dumps(self.decisions)
        counts = [d["outliers"] for d in self.decisions.values()]
        self.summary = (f"{len(counts)} layers, outlier channels per layer {min(counts)}–{max(counts)} "
                        f"(total {sum(counts)}), " + ("MixedInt8MatMul" if self.custom_op else "graph form"))
        return ir.passes.PassResult(model, modified=True)

    def _lower(self, graph: ir.Graph, target: QuantTarget, stats, opset: int) -> None:
        node, w = target.node, target.weight.astype(np.float32)
        k = w.shape[0]
        x = stats.rows.sample if stats.rows is not None else np.zeros((0, k), np.float32)
        if x.shape[0] == 0 or x.shape[1] != k:
            raise QCompileError(f"calibration saw no rows of {node.name}'s input")
        columns = np.random.default_rng(0).choice(w.shape[1], min(w.shape[1], 2048), replace=False)
        cap = int(np.floor(self.max_fraction * k))
        outliers, error = choose_outliers(x, w[:, np.sort(columns)], stats.channel_absmax, self.error_target, cap)
        self.decisions[node.name or node.outputs[0].name] = {
            "outliers": int(len(outliers)), "K": int(k), "error": round(error, 5)}
        if self.custom_op:
            out = emit_custom_op(graph, node, w, outliers)
        else:
            out = emit_graph(graph, node, w, outliers, opset, self.integer_to_float)
        out.producer().meta[EMITTED_KEY] = len(outliers)
        ir_utils.replace_output(node.outputs[0], out)
        graph.remove(node, safe=True)
