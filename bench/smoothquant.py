"""SmoothQuant benchmark: W8A8 with and without SmoothQuant, against onnxruntime.quantization.

SmolLM2-135M (perplexity on 16 held-apart windows × 512 tokens; 64 calibration windows) and
all-MiniLM-L6-v2 (cosine to fp32 on held-apart sentences): every row is compiled from the same
calibration split and evaluated on the same held-apart split in this one run; latency
interleaved (ONNX Runtime CPU, 2 threads, median). ORT's own SmoothQuant option needs Intel Neural Compressor 2.x,
which pins numpy < 2: it runs only when ``neural_compressor`` imports (see
``bench/README.md``), else its row says why. Writes ``bench/results/smoothquant.{json,md}``.

    python bench/smoothquant.py [--models smollm2 minilm] [--work out/bench]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import w8a8 as base  # noqa: E402  (bench/w8a8.py: shared evaluation and table code)

import models  # noqa: E402
import models.data  # noqa: E402
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static  # noqa: E402

from qcompiler.config import CalibrationConfig, W8A8Config  # noqa: E402
from qcompiler.pipeline import compile_model  # noqa: E402

RESULTS = "smoothquant"
# SmolLM2's smoothed down_proj inputs are heavy-tailed: per-channel maxima over 16 windows
# miss held-apart spikes 3-10× larger, and static ranges fitted to 16 windows clip them
# (×1.0758 at α=0.8); 64 windows give ×1.049. ORT's calibrator keeps every activation in
# memory, so it keeps base.ORT_STATIC_SAMPLES windows.
CALIB_WINDOWS = {"smollm2": 64}


def qcompile_variants(name: str, float_path: Path) -> dict[str, W8A8Config]:
    if name == "minilm":  # no outlier channels by the auto rule: SmoothQuant asked for
        return {
            "qcompile static": W8A8Config(activations="static", smoothquant=False),
            "qcompile static + SmoothQuant": W8A8Config(activations="static", smoothquant=True),
            "qcompile per-token + SmoothQuant": W8A8Config(activations="per-token", smoothquant=True),
        }
    return {
        "qcompile per-token + SmoothQuant": W8A8Config(activations="per-token"),
        "qcompile static": W8A8Config(activations="static", smoothquant=False),
        "qcompile static + SmoothQuant": W8A8Config(activations="static"),
        "qcompile static + SmoothQuant α=0.8": W8A8Config(activations="static", smoothquant_alpha=0.8),
    }


def _ort_static(float_path: str, calib: list[dict], smooth: bool):
    options = {"SmoothQuant": True, "SmoothQuantAlpha": 0.5} if smooth else {}

    def run(path: str) -> None:
        quantize_static(float_path, path, base._Reader(calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, extra_options=options)
    return run


def _neural_compressor_missing() -> str:
    try:
        import neural_compressor.adaptor.ox_utils.smooth_quant  # noqa: F401
    except Exception as exc:
        return f"not run: neural-compressor is not importable ({type(exc).__name__}); it pins numpy<2"
    return ""


def build_variants(name: str, float_path: Path, work: Path) -> dict[str, dict]:
    calib = models.data.model_feeds(name, "calib", CALIB_WINDOWS.get(name, base.CALIB_SAMPLES[name]))
    out = {"fp32": {"path": float_path, "compile_s": 0.0}}
    for label, config in qcompile_variants(name, float_path).items():
        path = work / f"{name}.{label.replace(' ', '_').replace('=', '')}.onnx"
        result = compile_model(float_path, path, config, feeds=lambda: iter(calib), progress=False)
        out[label] = {"path": path, "compile_s": result.seconds}
        print(f"  {label}: {result.seconds:.0f}s", flush=True)
    ort_calib = calib[: base.ORT_STATIC_SAMPLES[name]]
    for label, smooth in (("ORT quantize_static", False), ("ORT quantize_static + SmoothQuant α=0.5", True)):
        path = work / f"{name}.ort-static{'-sq' if smooth else ''}.onnx"
        missing = _neural_compressor_missing() if smooth else ""
        if missing:
            out[label] = {"error": missing}
            continue
        start = time.perf_counter()
        try:
            _ort_static(str(float_path), ort_calib, smooth)(str(path))
        except Exception as exc:  # the baseline tool's own failure is a result too
            out[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            continue
        out[label] = {"path": path, "compile_s": time.perf_counter() - start}
    return out


def main() -> None:
    base.run(__doc__.splitlines()[0], ["smollm2", "minilm"], build_variants, RESULTS)


if __name__ == "__main__":
    main()
