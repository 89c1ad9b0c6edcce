"""Choose the low-bit form of every MatMul weight not yet decided (weight-only recipes).

Methods (``W: [K, N]``, ``y = x W``, groups of ``g`` input channels per output channel):

* ``rtn``: round to nearest, ``q = clip(round(W/s) + z)`` per group (``quant_math``);
* ``gptq``: rows of ``W`` quantized one by one, each rounding error pushed onto the rows not yet
  quantized through the inverse Hessian ``H = 2XᵀX/n`` of the layer's inputs
  (``qcompiler.gptq``). Layers go in graph order and each layer's ``X`` comes from the model
  whose earlier layers are already quantized (``qcompiler.sequential``), as in Frantar et al.;
  one Hessian at a time is held (layers reading one ``X`` share it); tokens with outsized norms
  are capped (``capped_rows``);
* ``kmeans``: ``2^bits`` centroids per output channel (``group_size=0``: per tensor) and
  ``bits``-bit indices (``qcompiler.kmeans``).

The LM head (the MatMul whose output is a graph output) gets ``lm_head_bits``, per channel, by
round to nearest, when that differs from ``bits``.

The decision goes into ``node.meta[WEIGHT_KEY]`` (a ``PackedWeight``); the emitters rewrite
the graph. Weights already decided (kept on their grid, AWQ) are left alone.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import onnx_ir as ir

from passes.select_targets import QuantTarget, targets
from qcompiler import gptq, ir_utils, kmeans, sequential
from qcompiler import quant_math as qm
from qcompiler.calibration import FeedSource
from qcompiler.config import WeightOnlyConfig
from qcompiler.errors import QCompileError
from qcompiler.packed_weight import WEIGHT_KEY, PackedWeight

HESSIAN_ROW_CAP = 99.0  # percentile of token norms above which rows are scaled down (capped_rows)


def weight_format(config: WeightOnlyConfig) -> qm.WeightFormat:
    return qm.WeightFormat(config.bits, config.group_size or None, config.symmetric)


def capped_rows(batches: list[np.ndarray], percentile: float) -> list[np.ndarray]:
    """Rows whose norm exceeds the ``percentile``-th of all row norms, scaled down to it.

    ``H = Σ x_t x_tᵀ`` weighs each token by ``‖x_t‖²``; a language model's attention-sink
    tokens carry massive activations (SmolLM2: |x| ≈ 3,000 where the rest are ≲ 10) and would
    make GPTQ fit those few tokens at the others' expense (SmolLM2 4-bit g128: perplexity
    ×1.404 uncapped, ×1.350 capped at the 99th percentile).
    """
    norms = [np.linalg.norm(rows, axis=1, keepdims=True) for rows in batches]
    cap = np.percentile(np.concatenate(norms), percentile)
    return [rows * np.minimum(1.0, cap / np.maximum(n, 1e-30)) for rows, n in zip(batches, norms)]


def is_lm_head(node: ir.Node) -> bool:
    """The MatMul producing a graph output (a language model's logits)."""
    return node.outputs[0].is_graph_output()


def rtn(weight: np.ndarray, fmt: qm.WeightFormat) -> PackedWeight:
    return PackedWeight.from_quantized(fmt.quantize(weight), fmt.bits, "rtn")


def kmeans_weight(weight: np.ndarray, bits: int, per_channel: bool) -> PackedWeight:
    book = kmeans.kmeans_quantize(weight, bits, per_channel)
    return PackedWeight(bits, weight.shape[0], book.indices, "kmeans", codebook=book.centroids)


class QuantizeWeightOnlyPass(ir.passes.InPlacePass):
    """Attach a ``PackedWeight`` to every undecided MatMul target by ``method``."""

    def __init__(
        self, config: WeightOnlyConfig, method: str, feeds: FeedSource | None = None, progress: bool = True
    ) -> None:
        super().__init__()
        if method == "gptq" and feeds is None:
            raise QCompileError("GPTQ measures activations: pass --calib-data or --calib-text")
        self.config, self.method, self.feeds, self.progress = config, method, feeds, progress
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        todo = [t for t in targets(model)
                if t.op_type == "MatMul" and t.channel_axis == 1 and WEIGHT_KEY not in t.node.meta]
        head_bits = self.config.lm_head_bits
        if head_bits is not None and head_bits != self.config.bits:
            head_format = qm.WeightFormat(head_bits, None, self.config.symmetric)
            for t in [t for t in todo if is_lm_head(t.node)]:
                t.node.meta[WEIGHT_KEY] = rtn(t.weight, head_format)
                todo.remove(t)
        if self.method == "gptq" and todo:
            self._gptq(model, todo)
        else:
            fmt = weight_format(self.config)
            for t in todo:
                t.node.meta[WEIGHT_KEY] = (kmeans_weight(t.weight, self.config.bits, self.config.group_size != 0)
                                           if self.method == "kmeans" else rtn(t.weight, fmt))
                ir_utils.release_array_pages(t.weight)  # one float weight resident at a time
        methods = collections.Counter(t.node.meta[WEIGHT_KEY].method for t in targets(model) if WEIGHT_KEY in t.node.meta)
        self.summary = ", ".join(f"{n} {m}" for m, n in sorted(methods.items()))
        return ir.passes.PassResult(model, modified=False)  # annotations only; emitters rewrite

    def _gptq(self, model: ir.Model, todo: list[QuantTarget]) -> None:
        """Layer groups in graph order, each from the partly quantized model's activations."""
        fmt = weight_format(self.config)
        by_weight: dict[str, list[QuantTarget]] = collections.defaultdict(list)
        for t in todo:
            by_weight[t.node.inputs[1].name].append(t)
        device = _device()
        clip = gptq.CLIP_RATIOS if self.config.clip_search else (1.0,)

        def quantize(index: int, stage: sequential.Stage, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
            hessian = gptq.HessianAccumulator(batches[0].shape[-1])
            for rows in capped_rows(batches, HESSIAN_ROW_CAP):
                hessian.update(rows)
            h = hessian.hessian()
            replaced = {}
            for value in stage.weights:
                readers = by_weight[value.name]
                result = gptq.gptq_quantize(readers[0].weight, h, fmt, act_order=self.config.act_order,
                                            damp=self.config.damp, device=device, clip_ratios=clip)
                packed = PackedWeight.from_quantized(result.quantized, fmt.bits, "gptq")
                for t in readers:
                    t.node.meta[WEIGHT_KEY] = packed
                replaced[value.name] = packed.dequantize()
            return replaced

        feeds = list(itertools.islice(self.feeds(), self.config.calibration.max_samples))
        stages = sequential.stages_by_activation([t.node for t in todo])
        sequential.run_stages(model, stages, feeds, quantize,
                              mask_padding=self.config.calibration.mask_padding, progress=self.progress)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
