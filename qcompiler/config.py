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
    def smoothquant_on(self) -> bool:
        """SmoothQuant asked for explicitly (by the flag or a fixed α)."""
        return bool(self.smoothquant) or self.smoothquant_alpha is not None

    def flags(self) -> dict:
        """The settings as plain data, for provenance metadata."""
        return dataclasses.asdict(self)


RECIPES: dict[str, type] = {"w8a8": W8A8Config}
