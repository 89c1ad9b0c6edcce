"""Frozen configuration dataclasses and the registry of recipes.

A recipe flag on the command line (``--w8a8``) names a config class here; the pipeline maps the
config to its list of passes (``qcompiler.pipeline``). Configs validate themselves in
``__post_init__`` so that a bad combination fails before any work is done.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from qcompiler.errors import QCompileError
from qcompiler.ranges import CALIBRATION_METHODS
from qcompiler.sensitivity import Objective

ActivationScheme = Literal["static", "dynamic", "per-token", "per-token-sym"]
ACTIVATION_SCHEMES: tuple[str, ...] = ("static", "dynamic", "per-token", "per-token-sym")
QUANTIZABLE_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
# ort-cpu: ONNX Runtime's integer kernels; qdq: portable Q/DQ (TensorRT's placement);
# ort-cuda: what the CUDA provider runs fast (Q/DQ until our kernels land).
TARGETS: tuple[str, ...] = ("ort-cpu", "ort-cuda", "qdq")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How activation ranges are found for static quantization.

    ``method``: minmax | percentile | entropy | mse (``qcompiler.ranges``).
    ``percentile``: the two-sided percentile kept by ``percentile``.
    ``max_samples``: stop after this many calibration feeds (None: all).
    ``mask_padding``: leave out of the statistics the positions whose ``attention_mask`` is 0,
    so that padded tokens never widen a range.
    """

    method: str = "mse"
    percentile: float = 99.999
    max_samples: int | None = None
    mask_padding: bool = True

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise QCompileError(
                f"unknown calibration method {self.method!r}; choose one of "
                + ", ".join(CALIBRATION_METHODS)
            )
        if not 50.0 < self.percentile <= 100.0:
            raise QCompileError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.max_samples is not None and self.max_samples < 1:
            raise QCompileError(f"--max-calib-samples must be ≥ 1, got {self.max_samples}")


@dataclasses.dataclass(frozen=True)
class W8A8Config:
    """int8 weights (symmetric, per output channel) and 8-bit activations.

    ``activations``:
      * ``static``: one uint8 scale/zero point per tensor, calibrated offline (QDQ);
      * ``dynamic``: one uint8 scale/zero point per tensor, computed at run time;
      * ``per-token``: one scale and offset per row of the activation matrix (asymmetric),
        computed at run time; the offset is applied through precomputed weight column sums so
        that ONNX Runtime's fast U8S8 kernels (scalar zero point) still run;
      * ``per-token-sym`` (default): one symmetric scale per row, stored as ``round(x/s_row) + 128``
        (faster than ``per-token``, as accurate on SmolLM2: see the benchmark).
    ``op_types``: which weighted ops are quantized. ``exclude``: node names left in float.
    Activation×activation MatMuls (attention scores) stay in float.
    ``target``: ``ort-cpu`` lowers to ONNX Runtime's integer kernels; ``qdq`` keeps standard
    Q/DQ pairs placed by TensorRT's rules; ``ort-cuda`` keeps Q/DQ on the weighted ops' inputs
    only (the CUDA provider has no integer kernels to gain from more). Both need static
    activations.
    ``float_residuals``: static only — quantize only the inputs of weighted ops; residual adds
    (and the outputs feeding them) stay float. More accurate on CNNs (MobileNetV2 photo crops
    96% vs 94% top-1 agreement), slower (their convs cannot requantize into an integer add).
    ``smoothquant``: fold per-channel scales that move activation outliers into the weights
    (``passes.smoothquant``; needs calibration data). None (default): only when calibration
    finds outlier channels. ``smoothquant_alpha``: fix the migration strength ``α`` instead of
    searching it per layer.
    ``blockwise_lm_head``: run-time schemes on ort-cpu: the MatMul producing the logits takes
    int8 activations per block of input channels (``passes.blockwise_lm_head``).
    ``accuracy_target``: static only — move the fewest, most sensitive layers up to per-token
    activations, then to float, until it is met on ``sensitivity_samples`` calibration samples
    (with ``sensitivity_margin`` standard errors of the per-sample mean to spare),
    at most ``max_float_fraction`` of the quantized layers in float
    (``passes.keep_sensitive_float``). ``fallback``: ``per-token`` (that ladder; ort-cpu, the
    default there) or ``float`` (float only; the default for other targets).
    """

    activations: ActivationScheme = "per-token-sym"
    calibration: CalibrationConfig = CalibrationConfig()
    op_types: tuple[str, ...] = QUANTIZABLE_OPS
    exclude: tuple[str, ...] = ()
    quantize_embeddings: bool = True
    target: str = "ort-cpu"
    float_residuals: bool = False
    smoothquant: bool | None = None
    smoothquant_alpha: float | None = None
    blockwise_lm_head: bool = True
    accuracy_target: Objective | None = None
    max_float_fraction: float = 0.1
    sensitivity_samples: int = 8
    sensitivity_margin: float = 0.0
    fallback: str | None = None

    name = "w8a8"

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATION_SCHEMES:
            raise QCompileError(
                f"unknown activation scheme {self.activations!r}; choose one of "
                + ", ".join(ACTIVATION_SCHEMES)
            )
        if self.target not in TARGETS:
            raise QCompileError(f"unknown target {self.target!r}; choose one of " + ", ".join(TARGETS))
        if self.target != "ort-cpu" and self.activations != "static":
            raise QCompileError(
                f"--target {self.target} emits Q/DQ with calibrated scales: use --activations "
                f"static with --calib-data (run-time {self.activations} scales are an ONNX "
                "Runtime CPU lowering)"
            )
        if self.float_residuals and self.activations != "static":
            raise QCompileError("--float-residuals applies to static activations (--calib-data)")
        if self.smoothquant_alpha is not None:
            if not 0.0 <= self.smoothquant_alpha <= 1.0:
                raise QCompileError(f"--smoothquant-alpha must be in [0, 1], got {self.smoothquant_alpha}")
            if self.smoothquant is False:
                raise QCompileError("--smoothquant-alpha contradicts --no-smoothquant")
        unknown = set(self.op_types) - set(QUANTIZABLE_OPS)
        if unknown:
            raise QCompileError(f"cannot quantize op types {sorted(unknown)}")
        if self.accuracy_target is not None and self.activations != "static":
            raise QCompileError("an accuracy target (--max-ppl-increase, --min-cosine, --min-top1-agreement) "
                                "searches static activations: pass --calib-data (and no --activations)")
        _check_sensitivity(self)
        if self.fallback not in (None, "per-token", "float"):
            raise QCompileError(f"--fallback is per-token or float, not {self.fallback!r}")
        if self.fallback == "per-token" and self.target != "ort-cpu":
            raise QCompileError(f"--fallback per-token is an ONNX Runtime CPU lowering; --target {self.target} "
                                "takes --fallback float")

    @property
    def per_token_fallback(self) -> str | None:
        """The per-token scheme sensitive layers may move to before float, or None."""
        fallback = self.fallback or ("per-token" if self.target == "ort-cpu" else "float")
        return "per-token" if fallback == "per-token" else None

    def describe(self) -> str:
        return f"{self.activations} activations"

    @property
    def placement(self) -> str:
        """Q/DQ placement rules (``passes.activation_points``)."""
        if self.float_residuals or self.target == "ort-cuda":
            return "weighted"  # ort-cuda: no integer add kernel, quantizing adds only costs
        return "fusable" if self.target == "ort-cpu" else "all"

    @property
    def needs_calibration(self) -> bool:
        return self.activations == "static" or self.smoothquant_on

    @property
    def lm_head_blockwise(self) -> bool:
        """Whether the LM head runs as block-wise int8 (run-time schemes on ort-cpu)."""
        return self.blockwise_lm_head and self.activations != "static" and self.target == "ort-cpu"

    @property
    def smoothquant_on(self) -> bool:
        """SmoothQuant asked for explicitly (by the flag or a fixed α)."""
        return bool(self.smoothquant) or self.smoothquant_alpha is not None

    def flags(self) -> dict:
        """The settings as plain data, for provenance metadata."""
        return dataclasses.asdict(self)


WEIGHT_ONLY_METHODS: tuple[str, ...] = ("auto", "rtn", "gptq", "awq", "awq-gptq", "kmeans")


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
    """Low-bit weights, float activations (``--w4a16``, ``--w8a16``): for memory-bound models.

    ``bits``: 2, 3, 4 or 8. ``group_size``: input channels per scale (None: per output
    channel). ``symmetric``: signed integers and no zero point (default: asymmetric, unsigned
    with a zero point per group). ``method``: ``rtn`` (round to nearest), ``gptq`` (Hessian-
    aware rounding, calibrated, layers in order), ``awq`` (activation-aware scales and
    clipping, calibrated), ``awq-gptq`` (AWQ's scales folded, then GPTQ on the scaled weights), ``kmeans`` (a codebook of ``2^bits`` values per output channel, or
    per tensor with ``group_size=0``), ``auto`` (with calibration data: candidates compiled, the
    one losing least on held-apart calibration samples kept, ``qcompiler.weight_only_auto``;
    else ``rtn``).
    ``act_order``: GPTQ processes input channels by decreasing Hessian diagonal.
    ``clip_search``: GPTQ fixes each group's range by a clipping search (ratios 1 … 0.75 of
    min-max, per output column, minimising the group's H-weighted rounding error; ``gptq``).
    ``keep_grid``: a weight whose values already lie on a low-bit grid (a GGUF/QAT checkpoint)
    keeps exactly that grid instead of being re-quantized.
    ``quantize_embeddings``: embedding tables (Gather) as int8 per row.
    ``lm_head_bits``: the bits of the MatMul that produces the logits (a graph output; in small
    LMs the table tied to the embedding): 8 by default, per channel, round to nearest, as
    llama.cpp keeps its output tensor at 6–8 bits: it is the most sensitive weight (SmolLM2,
    4-bit g128 RTN: perplexity ×1.29 with it in float, ×1.61 with it at 4 bits). None: as
    ``bits``.
    ``target``: ``ort-cpu``/``ort-cuda`` emit ONNX Runtime's ``MatMulNBits``; ``qdq`` standard
    blocked ``DequantizeLinear`` (opset 21, INT4/UINT4).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    method: str = "auto"
    act_order: bool = False
    clip_search: bool = False
    keep_grid: bool = True
    damp: float = 0.01
    calibration: CalibrationConfig = CalibrationConfig()
    exclude: tuple[str, ...] = ()
    quantize_embeddings: bool = True
    lm_head_bits: int | None = 8
    target: str = "ort-cpu"
    op_types: tuple[str, ...] = ("MatMul",)

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise QCompileError(f"--bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.lm_head_bits not in (None, 2, 3, 4, 8):
            raise QCompileError(f"--lm-head-bits must be 2, 3, 4 or 8, got {self.lm_head_bits}")
        if self.method not in WEIGHT_ONLY_METHODS:
            raise QCompileError(
                f"unknown method {self.method!r}; choose one of " + ", ".join(WEIGHT_ONLY_METHODS))
        if self.group_size is not None and self.group_size < 0:
            raise QCompileError(f"--group-size must be positive, got {self.group_size}")
        if self.group_size == 0 and self.method != "kmeans":
            raise QCompileError("--group-size 0 (one codebook per tensor) applies to --method kmeans")
        if self.method == "kmeans" and self.group_size not in (None, 0):
            raise QCompileError("--method kmeans keeps one codebook per output channel (or per tensor "
                                f"with --group-size 0), not groups of {self.group_size}")
        if self.target not in TARGETS:
            raise QCompileError(f"unknown target {self.target!r}; choose one of " + ", ".join(TARGETS))
        if self.act_order and self.method not in ("gptq", "awq-gptq", "auto"):
            raise QCompileError("--act-order applies to --method gptq")
        if self.clip_search and self.method not in ("gptq", "awq-gptq", "auto"):
            raise QCompileError("--clip-search applies to --method gptq (AWQ searches its own clipping)")
        if not 0.0 < self.damp < 1.0:
            raise QCompileError(f"GPTQ dampening must be in (0, 1), got {self.damp}")

    @property
    def name(self) -> str:
        return f"w{self.bits}a16"

    def describe(self) -> str:
        groups = "per channel" if self.group_size is None else (
            "one codebook per tensor" if self.group_size == 0 else f"groups of {self.group_size}")
        return f"{self.bits}-bit weights ({self.method}, {groups}), float activations"

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq", "awq-gptq")

    def resolved_method(self, have_calibration: bool) -> str:
        """``auto`` → ``gptq`` when calibration data is given, ``rtn`` otherwise."""
        if self.method != "auto":
            return self.method
        return "gptq" if have_calibration else "rtn"

    def flags(self) -> dict:
        return dataclasses.asdict(self)


FP8_CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "mse")
FP8_WEIGHT_GRANULARITIES: tuple[str, ...] = ("per-channel", "per-tensor")


def _check_sensitivity(config) -> None:
    """The accuracy-target settings shared by ``W8A8Config`` and ``FP8Config``."""
    if not 0.0 <= config.max_float_fraction <= 1.0:
        raise QCompileError(f"--max-float-fraction must be in [0, 1], got {config.max_float_fraction}")
    if config.sensitivity_samples < 1:
        raise QCompileError(f"--sensitivity-samples must be ≥ 1, got {config.sensitivity_samples}")
    if not 0.0 <= config.sensitivity_margin <= 10.0:
        raise QCompileError(f"--sensitivity-margin is a number of standard errors in [0, 10], got "
                            f"{config.sensitivity_margin}")


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """FP8 E4M3 weights and static activations as Q/DQ (``--fp8``; ``passes.quantize_fp8``).

    ``weights``: ``per-channel`` (one scale per output channel; default for ``qdq``/``ort-cpu``)
    or ``per-tensor`` (required by ``ort-cuda``: cuBLASLt's FP8 matmul takes one scale per
    operand). None: the target's default. Activations: one static scale per tensor,
    ``amax/448`` from calibration (``calibration.method`` ``minmax`` or ``mse`` on the fp8
    grid). ``target``: ``qdq``/``ort-cpu`` keep portable Q/DQ (ONNX Runtime's CPU provider runs
    them as the reference); ``ort-cuda`` rewrites the MatMuls to ``com.microsoft.GemmFloat8``
    (TN layout, weights stored transposed). Attention MatMuls (activation×activation) stay
    float. ``lm_head``: also quantize the MatMul producing the logits (off: FP8 recipes keep it
    in 16 bits; it is the most sensitive layer). ``method``: how weights are rounded to E4M3,
    ``gptq`` (on the calibration inputs' Hessians) or ``rtn`` (to nearest). ``search_scales``:
    weight scales ``m · amax/448`` searched against ``diag H`` (with ``gptq``) and activation
    amaxes against the readers' output error on sampled calibration rows
    (``qcompiler.fp8.search_weight_scale``/``search_activation_amax``) instead of plain amax;
    off: on SmolLM2 it measured ×1.0189 (16 calibration windows) and ×1.0165 (64) against
    ×1.0186/×1.0161 without, within the run-to-run spread, for ~5 more minutes of compile.
    ``accuracy_target``: keep the fewest, most sensitive layers in float until it is met on
    ``sensitivity_samples`` calibration samples held apart (as ``W8A8Config``'s, float rung
    only; ``passes.keep_sensitive_float``), at most ``max_float_fraction`` of the fp8 layers.
    (SmoothQuant is not applied: E4M3's grid is relative, and on SmolLM2 smoothing before fp8
    measured ×1.0396 searched and ×1.0312 at α = 0.5 against ×1.0186 without, 16 windows.)
    """

    calibration: CalibrationConfig = CalibrationConfig(method="minmax")
    weights: str | None = None
    lm_head: bool = False
    method: str = "gptq"
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    exclude: tuple[str, ...] = ()
    quantize_embeddings: bool = True
    target: str = "qdq"
    search_scales: bool = False
    accuracy_target: Objective | None = None
    max_float_fraction: float = 0.1
    sensitivity_samples: int = 8
    sensitivity_margin: float = 0.0

    name = "fp8"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise QCompileError(f"unknown target {self.target!r}; choose one of " + ", ".join(TARGETS))
        if self.calibration.method not in FP8_CALIBRATION_METHODS:
            raise QCompileError(
                f"--fp8 takes --calib-method minmax or mse (amax on the fp8 grid), not {self.calibration.method!r}")
        if self.method not in ("gptq", "rtn"):
            raise QCompileError(f"--fp8 rounds weights by gptq or rtn, not {self.method!r}")
        if self.weights is not None and self.weights not in FP8_WEIGHT_GRANULARITIES:
            raise QCompileError(f"fp8 weights are per-channel or per-tensor, not {self.weights!r}")
        if self.target == "ort-cuda" and self.weights == "per-channel":
            raise QCompileError("--target ort-cuda runs cuBLASLt's FP8 GEMM, which takes one weight scale "
                                "per tensor: drop per-channel weights")
        unknown = set(self.op_types) - set(QUANTIZABLE_OPS)
        if unknown:
            raise QCompileError(f"cannot quantize op types {sorted(unknown)}")
        _check_sensitivity(self)

    @property
    def per_channel(self) -> bool:
        return (self.weights or ("per-tensor" if self.target == "ort-cuda" else "per-channel")) == "per-channel"

    needs_calibration = True

    def describe(self) -> str:
        granularity = "per-channel" if self.per_channel else "per-tensor"
        return (f"fp8 e4m3 {granularity} weights ({self.method}), static per-tensor activations "
                f"({self.calibration.method})" + (", searched scales" if self.search_scales else ""))

    def flags(self) -> dict:
        return dataclasses.asdict(self)


KV_CACHE_DTYPES: tuple[str, ...] = ("int8", "fp8")


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """8-bit KV cache of a decoder graph (``--kv-cache int8|fp8``; ``passes.quantize_kv_cache``).

    ``dtype``: ``int8`` (symmetric, ``s = max|x|/127``) or ``fp8`` (E4M3, ``s = max|x|/448``).
    Scales are per token and per head (one per 64-value head vector, computed when the entry
    is written, stored in float16 beside the cache), so no calibration is needed.
    """

    dtype: str = "int8"

    def __post_init__(self) -> None:
        if self.dtype not in KV_CACHE_DTYPES:
            raise QCompileError(f"--kv-cache takes {' or '.join(KV_CACHE_DTYPES)}, not {self.dtype!r}")

    name = "kv-cache"
    target = "qdq"  # standard ops only (Cast, Round, Clip, Q/DQ): runs anywhere
    needs_calibration = False

    def describe(self) -> str:
        return f"{self.dtype} KV cache, per-token per-head scales"

    def flags(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Int8MixedConfig:
    """LLM.int8() (``--int8-mixed``; ``passes.llm_int8``): int8 weights per output column and
    int8 activations per row, computed at run time, except a few outlier input channels per
    MatMul that multiply in fp16. The outlier set of each layer is the smallest set of
    top-``max|x|`` channels (calibrated) whose output error is at most ``error_target``
    (relative, on calibration rows), capped at ``max_outlier_fraction`` of the layer's inputs.
    ``target``: ``ort-cuda``: qcompile's ``MixedInt8MatMul`` custom op (falls back to the graph
    form without the library); ``ort-cpu``: the graph form on ONNX Runtime's
    MatMulIntegerToFloat; ``qdq``: the graph form in standard ONNX (MatMulInteger).
    """

    error_target: float = 0.01
    max_outlier_fraction: float = 0.02
    calibration: CalibrationConfig = CalibrationConfig(max_samples=16)
    exclude: tuple[str, ...] = ()
    quantize_embeddings: bool = True
    target: str = "ort-cpu"
    op_types: tuple[str, ...] = ("MatMul",)

    name = "int8-mixed"
    needs_calibration = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise QCompileError(f"unknown target {self.target!r}; choose one of " + ", ".join(TARGETS))
        if not 0.0 < self.error_target < 1.0:
            raise QCompileError(f"--outlier-error must be in (0, 1), got {self.error_target}")
        if not 0.0 <= self.max_outlier_fraction <= 0.5:
            raise QCompileError(f"--max-outlier-fraction must be in [0, 0.5], got {self.max_outlier_fraction}")

    def describe(self) -> str:
        return (f"LLM.int8(): int8 rows × int8 columns, outlier channels in fp16 (error ≤ "
                f"{self.error_target:g}, at most {self.max_outlier_fraction:.0%} of K)")

    def flags(self) -> dict:
        return dataclasses.asdict(self)


RECIPES: dict[str, type] = {"w8a8": W8A8Config, "w4a16": WeightOnlyConfig, "w8a16": WeightOnlyConfig,
                            "fp8": FP8Config}
RECIPES["int8-mixed"] = Int8MixedConfig
