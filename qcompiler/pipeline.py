"""The compile pipeline: recipe → ordered passes → PassManager, read top to bottom.

W8A8 (``w8a8_passes``)::

    canonicalize            constants as initializers, no Identity, topological order
    select targets          which MatMul/Gemm/Conv are quantized (annotation only)
    smoothquant             with calibration data: per-channel scales folded into norms /
                            producing linears (α searched per group; auto: outliers only)
    calibrate               static only: observe the float model, before anything is rewritten
    quantize weights        int8 symmetric per output channel, behind DequantizeLinear
    quantize embeddings     large Gather tables as int8 rows + per-row scales
    bias correction         static only: −E[ΔW·x] from calibration means folded into biases
    activations             static: calibrated uint8 Q/DQ at the placement's points (target
                            inputs; residual-add and pooling inputs, see activation_points)
                            dynamic / per-token(-sym): lowered to MatMulInteger + rescale;
                            the LM head: MatMulNBits, int8 activations per block
    clean up                dead float weights and replaced ops removed, values named

    move Q/DQ               ort-cpu: across shape-only ops; equal round trips cancelled

That is the QDQ model (``--target qdq``: done). ``--target ort-cpu`` then lowers it
(``lowering_passes``)::

    precompute bias         float biases → int32 b^q on the s_x·s_w grid
    fuse integer ops        DQ → op → Q → QLinearConv / QLinearMatMul / QLinearAdd /
                            QLinearGlobalAveragePool; float-output MatMul/Gemm →
                            MatMulIntegerToFloat with −z_x·ΣW^q folded into the bias
    clean up

Weight-only (``weight_only_passes``: ``--w4a16``, ``--w8a16``)::

    canonicalize, select targets (MatMul only)
    keep grid               weights already on a low-bit grid (GGUF, QAT) keep it exactly
    awq                     --method awq: per-channel scales folded into norms/linears,
                            clipping searched, then round to nearest (awq-gptq: scales only)
    quantize weight-only    rtn | gptq (layers in order on the partly quantized model's
                            activations) | kmeans: a PackedWeight per MatMul
                            (--method auto with calibration data: this list is compiled
                            once per candidate method, qcompiler.weight_only_auto keeps one)
    quantize embeddings     large Gather tables as int8 rows
    emit                    ort-cpu: com.microsoft MatMulNBits; ort-cuda: qcompile Int4MatMul
                            (custom op, else MatMulNBits); qdq: opset-21
                            blocked DequantizeLinear with INT4/UINT4 weights
    clean up

FP8 (``fp8_passes``: ``--fp8``)::

    upgrade opset           to 19 if lower (float8 Q/DQ)
    canonicalize, select targets (MatMul/Gemm with constant weights; attention stays float)
    float reference         with an accuracy target: held-apart samples' float outputs
    calibrate               the weighted ops' activation inputs (placement "weighted")
    quantize fp8 weights    E4M3 behind DequantizeLinear, per channel (per tensor: ort-cuda),
                            rounded by GPTQ on the calibration Hessians (search_scales: scales
                            m·amax/448 searched against diag H); the LM head stays float
    insert fp8 Q/DQ         static per-tensor scales amax/448 (minmax or mse on the fp8 grid;
                            search_scales: m·amax/448, m searched on the readers' output error)
    quantize embeddings
    keep sensitive float    with an accuracy target: the fewest, most sensitive layers back
                            to float until it is met on the held-apart samples
    clean up
    emit GemmFloat8         ort-cuda only: com.microsoft GemmFloat8, TN layout (transB=1)

KV cache (``kv_cache_passes``: ``--kv-cache int8|fp8``, alone or after a recipe)::

    canonicalize, quantize KV cache (past/present 8-bit + float16 per-token scales), clean up

Every pass runs inside ``Measured``, which records what it changed (op types added/removed,
time); ``plan`` runs the same list on an in-memory copy with placeholder statistics in place of
calibration and writes nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

import qcompiler
from passes.awq import AWQPass
from passes.bias_correction import BiasCorrectionPass
from passes.blockwise_lm_head import BlockwiseLMHeadPass
from passes.calibrate import STATS_KEY, CalibratePass, activations_to_observe
from passes.canonicalize import CanonicalizePass
from passes.cleanup import CleanupPass
from passes.dynamic_activations import LowerDynamicActivationsPass
from passes.insert_static_qdq import InsertStaticQDQPass
from passes.emit_dequantize_linear import EmitDequantizeLinearPass
from passes.emit_matmulnbits import EmitMatMulNBitsPass
from passes.emit_custom_ops import EmitInt4MatMulPass
from passes.llm_int8 import LLMInt8Pass
from passes.integer_ops import FuseIntegerOpsPass
from passes.keep_grid import KeepGridPass
from passes.keep_sensitive_float import KeepSensitiveFloatPass
from passes.move_qdq import MoveQDQPass
from passes.precompute_bias import PrecomputeBiasPass
from passes.quantize_embeddings import QuantizeEmbeddingsPass
from passes.quantize_weight_only import QuantizeWeightOnlyPass, weight_format
from passes.quantize_weights import QuantizeWeightsPass
from passes.emit_gemm_float8 import EmitGemmFloat8Pass
from passes.float_reference import FloatReferencePass
from passes.quantize_fp8 import SEARCH_ROWS, FP8CalibratePass, InsertFP8QDQPass, QuantizeFP8WeightsPass
from passes.quantize_kv_cache import QuantizeKVCachePass
from passes.upgrade_opset import UpgradeOpsetPass
from passes.select_targets import SelectTargetsPass, targets
from passes.smoothquant import SmoothQuantPass, groups
from qcompiler import ir_utils, verify, weight_only_auto
from qcompiler.calib_data import CalibrationInput
from qcompiler.calibration import FeedSource, split_feeds
from qcompiler.config import FP8Config, Int8MixedConfig, KVCacheConfig, W8A8Config, WeightOnlyConfig
from qcompiler.errors import QCompileError
from qcompiler.ranges import TensorStats
from runtime import custom_ops


def w8a8_passes(
    config: W8A8Config, feeds: FeedSource | None, progress: bool = True
) -> list[ir.passes.PassBase]:
    """The whole W8A8 pass list: quantization to Q/DQ, then the target's lowering."""
    return qdq_passes(config, feeds, progress) + lowering_passes(config)


def weight_only_passes(
    config: WeightOnlyConfig, feeds: FeedSource | None, progress: bool = True
) -> list[ir.passes.PassBase]:
    """Low-bit weights, float activations, emitted for the target."""
    method = config.resolved_method(feeds is not None)
    passes: list[ir.passes.PassBase] = [
        CanonicalizePass(),
        SelectTargetsPass(config.op_types, config.exclude),
    ]
    if config.keep_grid:
        # Before any method: a weight on a grid must not be rescaled or re-rounded.
        passes.append(KeepGridPass(config.bits))
    if method in ("awq", "awq-gptq"):  # awq-gptq: AWQ's scales only, then GPTQ on the scaled weights
        passes.append(AWQPass(feeds, weight_format(config), config.calibration, progress, config.lm_head_bits,
                              quantize=method == "awq"))
    passes.append(QuantizeWeightOnlyPass(config, "gptq" if method == "awq-gptq" else method, feeds, progress))
    if config.quantize_embeddings:
        passes.append(QuantizeEmbeddingsPass())
    if config.target == "qdq":
        passes.append(EmitDequantizeLinearPass())
    else:  # ort-cuda: qcompile's Int4MatMul where it applies (and the library is built)
        passes.append(EmitInt4MatMulPass() if config.target == "ort-cuda" else EmitMatMulNBitsPass())
    passes.append(CleanupPass())
    return passes


def int8_mixed_passes(
    config: Int8MixedConfig, feeds: FeedSource | None, progress: bool = True
) -> list[ir.passes.PassBase]:
    """LLM.int8() (``--int8-mixed``): outlier channels per layer from calibration, then one
    MixedInt8MatMul (ort-cuda, library built) or its graph form per MatMul."""
    custom_op = config.target == "ort-cuda" and custom_ops.available()
    passes: list[ir.passes.PassBase] = [
        CanonicalizePass(),
        SelectTargetsPass(config.op_types, config.exclude),
        LLMInt8Pass(feeds, config.error_target, config.max_outlier_fraction, custom_op=custom_op,
                    integer_to_float=config.target != "qdq", calibration=config.calibration,
                    progress=progress),
    ]
    if config.quantize_embeddings:
        passes.append(QuantizeEmbeddingsPass())
    passes.append(CleanupPass())
    return passes


def quantization_passes(config, feeds: FeedSource | None, progress: bool = True) -> list[ir.passes.PassBase]:
    """The recipe's passes up to (and for weight-only, including) emission."""
    if isinstance(config, WeightOnlyConfig):
        return weight_only_passes(config, feeds, progress)
    if isinstance(config, FP8Config):
        return fp8_passes(config, feeds, progress)
    if isinstance(config, KVCacheConfig):
        return kv_cache_passes(config)
    if isinstance(config, Int8MixedConfig):
        return int8_mixed_passes(config, feeds, progress)
    return qdq_passes(config, feeds, progress)


def fp8_passes(config: FP8Config, feeds: FeedSource | None, progress: bool = True) -> list[ir.passes.PassBase]:
    """FP8 E4M3 Q/DQ with calibrated activation scales; ort-cuda: GemmFloat8."""
    if feeds is None:
        raise QCompileError("--fp8 uses static activation scales: pass --calib-data or --calib-text")
    passes: list[ir.passes.PassBase] = [
        UpgradeOpsetPass(19),
        CanonicalizePass(),
        SelectTargetsPass(config.op_types, config.exclude),
    ]
    reference = None
    if config.accuracy_target is not None:
        # As for W8A8: held-apart samples and the float model's outputs on them, taken first.
        held_feeds, feeds = split_feeds(feeds, config.sensitivity_samples)
        reference = FloatReferencePass(held_feeds, config.sensitivity_samples)
        passes.append(reference)
    passes += [
        # Calibrate the float model before any rewrite; only the weighted ops' inputs (+ Hessians).
        FP8CalibratePass(feeds, config.calibration, progress, hessians=config.method == "gptq",
                         keep_rows=SEARCH_ROWS if config.search_scales else 0),
        QuantizeFP8WeightsPass(config.per_channel, config.lm_head, gptq=config.method == "gptq",
                               search_scales=config.search_scales),
        # Reads the fp8 weights' marks left by the previous pass.
        InsertFP8QDQPass(config.calibration.method, search_scales=config.search_scales),
    ]
    if config.quantize_embeddings:
        passes.append(QuantizeEmbeddingsPass())
    if config.accuracy_target is not None:
        passes.append(KeepSensitiveFloatPass(
            config.accuracy_target, reference, config.max_float_fraction, progress=progress,
            margin=config.sensitivity_margin))
    passes.append(CleanupPass())
    if config.target == "ort-cuda":
        passes += [EmitGemmFloat8Pass(), CleanupPass()]
    return passes


def kv_cache_passes(config: KVCacheConfig) -> list[ir.passes.PassBase]:
    """The decoder's past/present key/values stored in 8 bits (``passes.quantize_kv_cache``)."""
    return [CanonicalizePass(), QuantizeKVCachePass(config.dtype), CleanupPass()]


def lowering_passes(config: W8A8Config | WeightOnlyConfig) -> list[ir.passes.PassBase]:
    """From the QDQ model to the target's kernels (nothing for ``qdq`` and ``ort-cuda``)."""
    if isinstance(config, (WeightOnlyConfig, FP8Config, KVCacheConfig, Int8MixedConfig)):
        return []  # emitted for the target directly
    if config.target != "ort-cpu" or config.activations != "static":
        return []  # the dynamic schemes are lowered as they are inserted
    return [
        PrecomputeBiasPass(),
        # Reads the int32 biases of the previous pass.
        FuseIntegerOpsPass(),
        CleanupPass(),
    ]


def _smoothing_scheme(config: W8A8Config) -> str:
    """The activation scheme SmoothQuant's searched α is chosen for: with an accuracy target
    and the per-token rung, per-token. The rung's floor is then the model with every layer per
    token, which static-tuned α hurts (SmolLM2, held-apart: ×1.0247 at α = 0.8 against ×1.0063
    searched), while static layers' own ranges keep their calibration."""
    if config.accuracy_target is not None and config.per_token_fallback and config.smoothquant_alpha is None:
        return config.per_token_fallback
    return config.activations


def qdq_passes(
    config: W8A8Config, feeds: FeedSource | None, progress: bool = True
) -> list[ir.passes.PassBase]:
    """Quantization up to the QDQ model (``feeds`` is required for static activations)."""
    passes: list[ir.passes.PassBase] = [
        CanonicalizePass(),
        # Annotate before calibrating: only the inputs of the ops we quantize are observed.
        SelectTargetsPass(config.op_types, config.exclude),
    ]
    if config.lm_head_blockwise:
        passes.append(BlockwiseLMHeadPass())
    if config.smoothquant_on and feeds is None:
        raise QCompileError("SmoothQuant measures activations: pass --calib-data or --calib-text")
    reference = None
    if config.accuracy_target is not None and feeds is not None:
        # The target is measured on samples the ranges were not fitted to, as new data will be,
        # against the float model's outputs on them, taken before anything changes.
        held_feeds, feeds = split_feeds(feeds, config.sensitivity_samples)
        reference = FloatReferencePass(held_feeds, config.sensitivity_samples)
        passes.append(reference)
    if config.smoothquant is not False and feeds is not None:
        # Rescales the float model: before calibration, which must see the smoothed ranges.
        passes.append(SmoothQuantPass(
            feeds, _smoothing_scheme(config), config.smoothquant_alpha,
            enabled=True if config.smoothquant_on else None,
            calibration=config.calibration, progress=progress,
        ))
    if config.activations == "static":
        if feeds is None:
            raise QCompileError(
                "static activations need calibration data: pass --calib-data or --calib-text"
            )
        passes += [
            # Calibrate the float model: must come before any rewrite changes the activations.
            CalibratePass(feeds, config.calibration, progress, config.placement),
            QuantizeWeightsPass(),
            # Needs the float and the quantized weight and the calibrated channel means.
            BiasCorrectionPass(),
            InsertStaticQDQPass(config.calibration, config.placement),
        ]
    else:
        passes += [
            QuantizeWeightsPass(),
            # Reads the int8 weights the previous pass attached to each target.
            LowerDynamicActivationsPass(config.activations),
        ]
    if config.quantize_embeddings:
        passes.append(QuantizeEmbeddingsPass())
    if config.lm_head_blockwise:
        passes.append(EmitMatMulNBitsPass(accuracy_level=4))
    if config.accuracy_target is not None and config.activations == "static":
        # After every other quantization, so the target is measured on the model as it will
        # run (embeddings and LM head quantized too); before clean-up, so the layers it puts
        # back in float find the float weights and biases the Q/DQ model still holds.
        passes.append(KeepSensitiveFloatPass(
            config.accuracy_target, reference, config.max_float_fraction, progress=progress,
            per_token_scheme=config.per_token_fallback, margin=config.sensitivity_margin))
    passes.append(CleanupPass())
    if config.target == "ort-cpu" and config.activations == "static":
        # Still QDQ: bring each Q/DQ next to the op it belongs to, for the lowering's patterns.
        passes.append(MoveQDQPass())
    return passes


# --- measuring and running -------------------------------------------------------------------


@dataclasses.dataclass
class PassReport:
    """What one pass did."""

    name: str
    modified: bool
    added: dict[str, int]
    removed: dict[str, int]
    seconds: float
    note: str = ""  # the pass's own account (``summary`` attribute), for non-node changes

    def summary(self) -> str:
        if not self.added and not self.removed:
            return self.note or "no node changes"
        parts = [self.note] if self.note else []
        parts += [f"+{n} {op}" for op, n in sorted(self.added.items())]
        parts += [f"-{n} {op}" for op, n in sorted(self.removed.items())]
        return ", ".join(parts)


def _op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(
        f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph
    )


class Measured(ir.passes.InPlacePass):
    """Runs ``inner`` (its requires/call/ensures) and appends a ``PassReport`` to ``reports``."""

    def __init__(self, inner: ir.passes.PassBase, reports: list[PassReport]) -> None:
        super().__init__()
        self.inner, self.reports = inner, reports

    def __repr__(self) -> str:
        return type(self.inner).__name__

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before, start = _op_counts(model), time.perf_counter()
        result = self.inner(model)
        ir_utils.release_mapped_pages(model)  # the float weights it read need not stay resident
        after = _op_counts(model)
        self.reports.append(
            PassReport(
                name=type(self.inner).__name__,
                modified=result.modified,
                added=dict(after - before),
                removed=dict(before - after),
                seconds=time.perf_counter() - start,
                note=getattr(self.inner, "summary", ""),
            )
        )
        return ir.passes.PassResult(model, modified=result.modified)


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> list[PassReport]:
    """Run ``passes`` in order; a QCompileError raised inside a pass (bad calibration data, say)
    comes out as itself, not wrapped in onnx_ir's PassError."""
    reports: list[PassReport] = []
    if not passes:
        return reports
    try:
        ir.passes.PassManager([Measured(p, reports) for p in passes])(model)
    except ir.passes.PassError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, QCompileError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from exc
    return reports


# --- entry points ----------------------------------------------------------------------------


@dataclasses.dataclass
class CompileResult:
    output: Path
    reports: list[PassReport]
    seconds: float
    input_bytes: int
    output_bytes: int
    verification: verify.Verification | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # unusual input, left as it was


def compile_model(
    model_path: str | Path,
    output_path: str | Path,
    config: W8A8Config,
    feeds: FeedSource | None = None,
    calibration: CalibrationInput | None = None,
    progress: bool = True,
    verify_samples: int = 0,
    kv_cache: KVCacheConfig | None = None,
) -> CompileResult:
    """Compile ``model_path`` with ``config`` and write ``output_path`` atomically.

    The input file is only read. Calibration data (static activations) comes as in-memory
    ``feeds`` or as files (``calibration``, checked against the model's inputs).
    ``verify_samples > 0``: afterwards run float, QDQ and lowered models on that many
    calibration samples (``CompileResult.verification``; ``verify.require`` judges it).
    """
    model_path, output_path = Path(model_path), Path(output_path)
    _check_paths(model_path, output_path)
    start = time.perf_counter()
    model = ir_utils.load_model(model_path)
    notes = ir_utils.unusual_input_notes(model)
    digest = None
    if calibration is not None:
        feeds, digest = calibration.source(model), calibration.digest()
    if verify_samples and feeds is None:
        raise QCompileError("--verify runs calibration samples: pass --calib-data or --calib-text")
    if isinstance(config, WeightOnlyConfig) and config.method == "auto" and feeds is not None:
        del model  # each candidate compile loads its own
        return weight_only_auto.compile_auto(model_path, output_path, config, feeds, digest, compile_model,
                                             progress=progress, verify_samples=verify_samples, kv_cache=kv_cache)
    passes = quantization_passes(config, feeds, progress)
    if kv_cache is not None and not isinstance(config, KVCacheConfig):
        passes += kv_cache_passes(kv_cache)  # after the recipe: its calibration saw the float cache
    reports = run_passes(model, passes)
    if not isinstance(config, KVCacheConfig) and not any(
            r.name == "SelectTargetsPass" and r.modified for r in reports):
        notes.append("no MatMul/Gemm/Conv with a constant weight: no weighted op was quantized")
    lowering = lowering_passes(config)
    qdq = verify.snapshot(model) if verify_samples and lowering else None
    reports += run_passes(model, lowering)
    _stamp_provenance(model, config, reports, digest)
    for p in passes:
        if isinstance(p, SmoothQuantPass) and p.decisions:
            model.metadata_props["qcompile.smoothquant"] = json.dumps(p.decisions)
        if isinstance(p, KeepGridPass):
            model.metadata_props["qcompile.kept_grid"] = json.dumps(p.kept)
    ir_utils.save_model(model, output_path)
    seconds = time.perf_counter() - start
    verification = None
    if verify_samples:
        samples = list(itertools.islice(feeds(), verify_samples))
        verification = verify.check(model_path, qdq, output_path, samples)
    return CompileResult(
        output=output_path,
        reports=reports,
        seconds=seconds,
        input_bytes=model_file_bytes(model_path),
        output_bytes=model_file_bytes(output_path),
        verification=verification,
        notes=notes,
    )


def plan(model_path: str | Path, config: W8A8Config | WeightOnlyConfig) -> list[PassReport]:
    """The passes a compile would run and what each would change; writes nothing.
    (Weight-only: calibrated methods are previewed by round to nearest.)"""
    model = ir_utils.load_model(model_path)
    if isinstance(config, WeightOnlyConfig):
        preview = dataclasses.replace(config, method="rtn", act_order=False)
        return run_passes(model, weight_only_passes(preview, feeds=None, progress=False))
    passes = w8a8_passes(config, feeds=lambda: (), progress=False) if isinstance(config, W8A8Config) \
        else quantization_passes(config, feeds=lambda: (), progress=False)
    replacements = {CalibratePass: lambda p: PlanCalibratePass(p.placement),
                    FP8CalibratePass: lambda p: PlanCalibratePass("weighted"),
                    SmoothQuantPass: lambda p: PlanSmoothQuantPass(),
                    KeepSensitiveFloatPass: lambda p: PlanKeepSensitiveFloatPass(p),
                    FloatReferencePass: lambda p: PlanFloatReferencePass(p.samples)}
    passes = [replacements.get(type(p), lambda p: p)(p) for p in passes]
    return run_passes(model, passes)


class PlanSmoothQuantPass(ir.passes.InPlacePass):
    """Stands in for SmoothQuant in ``plan``: which groups have an exact absorber (whether
    each is smoothed depends on calibration data); changes nothing."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = groups(model)
        kinds = collections.Counter(g.absorber.kind.split(" ")[0] if g.absorber else "no absorber" for g in found)
        self.summary = f"{len(found)} groups could be smoothed (" + ", ".join(
            f"{n} {kind}" for kind, n in sorted(kinds.items())) + ")"
        return ir.passes.PassResult(model, modified=False)


class PlanFloatReferencePass(ir.passes.InPlacePass):
    """Stands in for ``FloatReferencePass`` in ``plan``: runs nothing."""

    def __init__(self, samples: int) -> None:
        super().__init__()
        self.summary = f"would keep the float outputs on the {samples} held calibration samples"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=False)


class PlanKeepSensitiveFloatPass(ir.passes.InPlacePass):
    """Stands in for the accuracy-target search in ``plan``: how many layers it may keep in
    float (the search needs calibration data); changes nothing."""

    def __init__(self, search: KeepSensitiveFloatPass) -> None:
        super().__init__()
        self.search = search

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = len(targets(model))
        cap = int(self.search.max_float_fraction * count)
        rung = "per-token activations first, then " if self.search.per_token_scheme else ""
        self.summary = (f"would move sensitive layers to {rung}float (at most {cap} of {count} layers in float) "
                        f"to meet {self.search.objective.kind} target {self.search.objective.bound:g} "
                        "(measured at compile on held-apart calibration samples)")
        return ir.passes.PassResult(model, modified=False)


def _channel_count(value: ir.Value) -> int:
    """Channels of a non-target activation (NCHW axis 1, else the last); 1 when unknown."""
    shape = value.shape
    if shape is None or len(shape) == 0:
        return 1
    dim = shape[1] if len(shape) == 4 else shape[-1]
    return dim if isinstance(dim, int) else 1


def _placeholder_range(value: ir.Value) -> tuple[float, float]:
    """[-1, 1], or the bounds of the Relu/Clip producing ``value`` (so that the plan absorbs
    the activation into the output grid as a real compile does)."""
    node = value.producer()
    if node is not None and node.op_type == "Relu":
        return 0.0, 1.0
    if node is not None and node.op_type == "Clip" and len(node.inputs) == 3:
        lo, hi = (ir_utils.constant_array(v) for v in node.inputs[1:])
        if lo is not None and hi is not None:
            return float(lo), float(hi)
    return -1.0, 1.0


class PlanCalibratePass(ir.passes.InPlacePass):
    """Stands in for calibration in ``plan``: placeholder statistics (range [-1, 1] or the
    producing Relu/Clip's bounds, one channel per input channel of the reader), no model run."""

    def __init__(self, placement: str = "fusable") -> None:
        super().__init__()
        self.placement = placement

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = activations_to_observe(model, self.placement)
        self.summary = f"would observe {len(values)} activations"
        channels = {id(t.activation): t.input_channels for t in targets(model)}
        for value in values:
            count = channels.get(id(value)) or _channel_count(value)
            stats = TensorStats(channel_axis=1)
            lo, hi = _placeholder_range(value)
            stats.update(np.tile(np.array([[lo], [hi]], np.float32), (1, count)))
            value.meta[STATS_KEY] = stats
        return ir.passes.PassResult(model, modified=False)


def _check_paths(model_path: Path, output_path: Path) -> None:
    if output_path.exists() and output_path.resolve() == model_path.resolve():
        raise QCompileError("the output path is the input model; choose another -o path")
    if output_path.suffix != ".onnx":
        raise QCompileError(f"the output path must end in .onnx: {output_path}")
    if output_path.is_dir():
        raise QCompileError(f"the output path is a folder: {output_path}")
    ir_utils.check_writable_folder(output_path.parent)  # before any work, not after it


def model_file_bytes(path: Path) -> int:
    """Bytes of the model file plus any external data files beside it that it names."""
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def _stamp_provenance(
    model: ir.Model, config: W8A8Config, reports: list[PassReport], digest: str | None
) -> None:
    props = model.metadata_props
    props["qcompile.version"] = qcompiler.__version__
    props["qcompile.recipe"] = config.name
    props["qcompile.flags"] = json.dumps(config.flags(), sort_keys=True)
    props["qcompile.passes"] = json.dumps(
        [{"pass": r.name, "added": r.added, "removed": r.removed} for r in reports]
    )
    if digest:
        props["qcompile.calibration_digest"] = digest
