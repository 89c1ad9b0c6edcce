"""FP8 E4M3 weights and activations as standard Q/DQ (``--fp8``; math in ``qcompiler.fp8``).

Three passes, run after ``SelectTargetsPass``:

* ``FP8CalibratePass``: runs the float model over the calibration feeds and keeps, for each
  target's activation input, its range statistics and (``hessians=True``) ``H = 2/n XᵀX``
  (``keep_rows``: and a uniform sample of rows);
* ``QuantizeFP8WeightsPass``: each target's weight ``W`` becomes
  ``DequantizeLinear(W^q, s, 0[, axis])`` with ``W^q`` a ``FLOAT8E4M3FN`` initializer and
  ``s = max|W| / 448`` per tensor, or per output channel (``axis``: opset 19's per-axis
  DequantizeLinear takes float8, and ONNX Runtime's CPU provider runs it). The E4M3 values are
  rounded to nearest, or by GPTQ when the activation carries a Hessian: E4M3 keeps 3 mantissa
  bits, ~32 dB SQNR on any weight against ~40 dB for int8 per channel, and GPTQ wins most of
  the difference back on the layer's output (SmolLM2 layers on held-out tokens: +2.5 to
  +8.5 dB). With a Hessian, the scales are first searched, ``s = m · max|W|/448`` against
  ``diag H`` (``fp8.search_weight_scale``);
* ``InsertFP8QDQPass``: the activation input of each fp8-weighted target reads
  ``DequantizeLinear(QuantizeLinear(x, s, 0), s, 0)`` with one static per-tensor
  ``s = amax / 448`` from calibration (``minmax``: max|x|; ``mse``: on the fp8 grid), the
  amax times a multiplier searched on the readers' output error where rows were sampled
  (``fp8.search_activation_amax``). One pair
  per activation value, shared by all its readers (q/k/v read one tensor).

Activation×activation MatMuls (attention scores and ``softmax·V``) are not targets and stay
float, as in W8A8: both operands would need a scale at run time, and the scores carry the
attention mask's −3.4e38. The zero points are float8 zeros, which fixes the Q output type.
The MatMul producing a graph output (the LM head) keeps its float weight and activation unless
``lm_head=True``. The rewriting passes are idempotent (a target already reading a
DequantizeLinear is skipped). Q/DQ-holding outputs are marked for ONNX Runtime
(``runtime.float8``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.calibrate import STATS_KEY, activations_to_observe
from passes.select_targets import TARGET_KEY, QuantTarget
from qcompiler import fp8, ir_utils
from qcompiler import quant_math as qm
from qcompiler.errors import QCompileError
from runtime import float8

FP8_WEIGHT_KEY = "qcompile.fp8_weight"
HESSIAN_KEY = "qcompile.hessian"
FP8_ACTIVATION_KEY = "qcompile.fp8_activation"
FP8_TYPE = ir.DataType.FLOAT8E4M3FN
MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear with float8
SEARCH_ROWS = 512  # calibration rows kept per activation for its amax search


def _dequantized(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


class FP8CalibratePass(ir.passes.InPlacePass):
    """Statistics of every target's activation input over ``feeds()`` (``STATS_KEY``), and
    with ``hessians`` its ``H = 2/n XᵀX`` (``HESSIAN_KEY``, float64 ``[K, K]``) for GPTQ;
    ``keep_rows``: the statistics also keep a uniform sample of that many rows (the
    activation scale search of ``InsertFP8QDQPass``).
    Positions where the feed's ``attention_mask`` is 0 are left out. Changes no node."""

    def __init__(self, feeds, config=None, progress: bool = True, hessians: bool = True, keep_rows: int = 0) -> None:
        super().__init__()
        self.feeds, self.progress, self.hessians, self.keep_rows = feeds, progress, hessians, keep_rows
        self.mask_padding = True if config is None else config.mask_padding
        self.max_samples = None if config is None else config.max_samples
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from tqdm import tqdm

        from qcompiler.calibration import MASK_INPUT, observing, valid_positions
        from qcompiler.gptq import HessianAccumulator
        from qcompiler.ranges import TensorStats

        values = activations_to_observe(model, "weighted")
        if not values:
            return ir.passes.PassResult(model, modified=False)
        stats = {v.name: TensorStats(channel_axis=-1, keep_rows=self.keep_rows) for v in values}
        hessians = {}
        samples = 0
        with observing(model, values) as run:
            for feed in tqdm(self.feeds(), desc="calibrating", unit="sample", disable=not self.progress):
                outputs = run(feed)
                mask = feed.get(MASK_INPUT) if self.mask_padding else None
                for v in values:
                    x = valid_positions(outputs[v.name], mask)
                    stats[v.name].update(x)
                    if self.hessians and x.size:
                        rows = x.reshape(-1, x.shape[-1])
                        rows = rows[np.isfinite(rows).all(axis=1)]
                        hessians.setdefault(v.name, HessianAccumulator(rows.shape[1])).update(rows)
                samples += 1
                if self.max_samples is not None and samples >= self.max_samples:
                    break
        if samples == 0:
            raise QCompileError("the calibration data holds no samples")
        for v in values:
            if stats[v.name].count == 0:
                raise QCompileError(f"activation {v.name!r} is not finite on any calibration sample")
            v.meta[STATS_KEY] = stats[v.name]
            if v.name in hessians and hessians[v.name].rows:
                v.meta[HESSIAN_KEY] = hessians[v.name].hessian()
        self.summary = f"observed {len(values)} activations" + (" (+ Hessians)" if hessians else "")
        return ir.passes.PassResult(model, modified=False)


class QuantizeFP8WeightsPass(ir.passes.InPlacePass):
    """Replace each target's float weight by E4M3 + DequantizeLinear (``per_channel``: one
    scale per output channel; else one per tensor). ``lm_head``: also the MatMul producing a
    graph output (a language model's logits); off by default, as FP8 recipes leave the LM head
    in 16 bits (SmolLM2: perplexity ×1.053 with it in fp8, ×1.029 without, 4 windows).
    ``search_scales``: where the activation carries a Hessian, each scale is
    ``fp8.search_weight_scale``'s (``m · amax/448`` weighted by ``diag H``) instead of
    ``amax/448``."""

    def __init__(self, per_channel: bool = True, lm_head: bool = False, gptq: bool = True,
                 search_scales: bool = False) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.lm_head = lm_head
        self.gptq = gptq
        self.search_scales = search_scales
        self.summary = ""

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < MIN_OPSET:
            raise QCompileError(f"fp8 Q/DQ needs opset ≥ {MIN_OPSET}; run passes.upgrade_opset.UpgradeOpsetPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for node in tuple(graph):
            target: QuantTarget | None = node.meta.get(TARGET_KEY)
            if target is None or FP8_WEIGHT_KEY in node.meta or _dequantized(node.inputs[1]):
                continue
            if not self.lm_head and node.outputs[0].is_graph_output():
                continue  # the LM head stays float
            node.meta[FP8_WEIGHT_KEY] = self._quantize(graph, target)
            modified = True
        done = [n for n in graph if FP8_WEIGHT_KEY in n.meta]
        by_gptq = sum(1 for n in done if getattr(n.meta[FP8_WEIGHT_KEY], "gptq", False))
        self.summary = f"{len(done)} weights to E4M3 ({by_gptq} by GPTQ)" if modified else ""
        return ir.passes.PassResult(model, modified=modified)

    def _quantize(self, graph: ir.Graph, target: QuantTarget) -> _Quantized:
        node = target.node
        granularity = qm.PerAxis(target.channel_axis) if self.per_channel else qm.PerTensor()
        quantized = fp8.quantize_tensor(target.weight, granularity)
        hessian = target.activation.meta.get(HESSIAN_KEY)
        by_gptq = False
        rows_in = hessian is not None and target.channel_axis == target.weight.ndim - 1 == 1
        if self.search_scales and rows_in:
            scale = fp8.search_weight_scale(target.weight, np.diag(hessian), self.per_channel)
            scale = scale.reshape(quantized.scale.shape)
            quantized = qm.QuantizedTensor(fp8.quantize(target.weight, scale, quantized.block), scale,
                                           quantized.zero_point, quantized.block)
        if self.gptq and rows_in:
            # W: [K, N] (y = x W): GPTQ rounds the K input rows against the inputs' Hessian.
            row_scale = quantized.scale.reshape(-1) if self.per_channel else quantized.scale.reshape(())
            q = fp8.gptq_quantize(target.weight, hessian, row_scale)
            quantized = qm.QuantizedTensor(q, quantized.scale, quantized.zero_point, quantized.block)
            by_gptq = True
        b = ir_utils.NodeBuilder(graph, node, node.name or node.outputs[0].name or "weight")
        scale = quantized.scale.reshape(-1) if self.per_channel else quantized.scale.reshape(())
        zero = np.zeros(scale.shape, fp8.FP8)
        attrs = {"axis": target.channel_axis} if self.per_channel else {}
        dq = b.op("DequantizeLinear",
                  [b.const("weight_fp8", quantized.q), b.const("weight_scale", scale), b.const("weight_zero", zero)],
                  "weight_dequantized", **attrs)
        dq.type, dq.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(target.weight.shape)
        node.replace_input_with(1, dq)
        return _Quantized(quantized, by_gptq)


class InsertFP8QDQPass(ir.passes.InPlacePass):
    """Static per-tensor E4M3 Q/DQ on the activation input of every fp8-weighted target.

    ``method``: ``minmax`` or ``mse`` (``qcompiler.fp8.activation_amax``). Needs the
    statistics ``FP8CalibratePass`` (or ``CalibratePass``) stored on each activation.
    ``search_scales``: where those statistics keep sampled rows, the amax becomes
    ``fp8.search_activation_amax``'s (the readers' float output error on those rows)."""

    def __init__(self, method: str = "minmax", search_scales: bool = False) -> None:
        super().__init__()
        self.method = method
        self.search_scales = search_scales
        self.scales: dict[str, float] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        dequantized: dict[int, ir.Value] = {}
        for node in tuple(graph):
            if FP8_WEIGHT_KEY not in node.meta or _dequantized(node.inputs[0]):
                continue
            x = node.inputs[0]
            if id(x) not in dequantized:
                dequantized[id(x)] = self._insert(graph, node, x)
            node.replace_input_with(0, dequantized[id(x)])
            node.meta[FP8_ACTIVATION_KEY] = True
            modified = True
        if modified:  # ONNX Runtime's CPU sessions must then skip their QDQ fusions (runtime.float8)
            model.metadata_props[float8.METADATA_KEY] = "1"
        return ir.passes.PassResult(model, modified=modified)

    def _insert(self, graph: ir.Graph, before: ir.Node, x: ir.Value) -> ir.Value:
        stats = x.meta.get(STATS_KEY)
        if stats is None:
            raise QCompileError(f"no calibration statistics for activation {x.name!r}")
        amax = fp8.activation_amax(stats, self.method)
        rows = stats.rows.sample if getattr(stats, "rows", None) is not None else None
        weights = _reader_weights(x)
        if self.search_scales and rows is not None and len(rows) and weights is not None:
            amax = fp8.search_activation_amax(rows, weights, amax)
        scale = fp8.scale_for(amax)
        self.scales[x.name or ""] = float(scale)
        b = ir_utils.NodeBuilder(graph, before, x.name or "activation")
        s = b.const("scale", np.asarray(scale, np.float32))
        z = b.const("zero_point", np.zeros((), fp8.FP8))
        q = b.op("QuantizeLinear", [x, s, z], "fp8")
        dq = b.op("DequantizeLinear", [q, s, z], "dequantized")
        q.type, q.shape = ir.TensorType(FP8_TYPE), x.shape
        dq.type, dq.shape = ir.TensorType(ir.DataType.FLOAT), x.shape
        return dq


def _reader_weights(x: ir.Value) -> np.ndarray | None:
    """The float weights ``[K, N]`` of the fp8 targets reading ``x``, concatenated along N
    (None when one is laid out otherwise)."""
    weights = []
    for node, _ in x.uses():
        target: QuantTarget | None = node.meta.get(TARGET_KEY)
        if target is None or FP8_WEIGHT_KEY not in node.meta:
            continue
        if target.channel_axis != target.weight.ndim - 1 or target.weight.ndim != 2:
            return None
        weights.append(target.weight)
    return np.concatenate(weights, axis=1) if weights else None


class _Quantized:
    """A weight's E4M3 values and scales, and whether GPTQ rounded them."""

    def __init__(self, tensor: qm.QuantizedTensor, gptq: bool) -> None:
        self.tensor, self.gptq = tensor, gptq
