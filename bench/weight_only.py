"""Weight-only benchmark: W8A16 / W4A16 / W3A16 by method, against ONNX Runtime's int4 quantizer.

SmolLM2-135M (perplexity on 16 held-apart windows × 512 tokens) and all-MiniLM-L6-v2 (cosine
to fp32 on held-apart sentences); every row compiled from the same calibration split and
evaluated on the same held-apart split in this one run (latency interleaved, ONNX Runtime CPU,
2 threads, median). Peak memory of each compile is measured in a child process. Methods are
compared at group 128 / per channel with grid detection off (SmolLM2's weights came from 4-bit
blocks of 32, which would flatter every method at group 32). Writes
``bench/results/weight_only.{json,md}``.

    python bench/weight_only.py [--models smollm2 minilm] [--work out/bench]
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import w8a8 as base  # noqa: E402  (bench/w8a8.py: shared evaluation and table code)

import models  # noqa: E402
import models.data  # noqa: E402

from qcompiler.config import WeightOnlyConfig  # noqa: E402
from qcompiler.pipeline import compile_model  # noqa: E402

RESULTS = "weight_only"
G128 = dict(group_size=128, keep_grid=False)


def qcompile_variants(name: str) -> dict[str, WeightOnlyConfig]:
    if name == "minilm":
        return {
            "qcompile w4a16 g128 rtn": WeightOnlyConfig(method="rtn", **G128),
            "qcompile w4a16 g128 awq": WeightOnlyConfig(method="awq", **G128),
            "qcompile w4a16 g128 gptq": WeightOnlyConfig(method="gptq", **G128),
            "qcompile w4a16 g128 auto (default method)": WeightOnlyConfig(**G128),
        }
    return {
        "qcompile w4a16 (default: keep grid)": WeightOnlyConfig(),
        "qcompile w8a16 per-channel rtn": WeightOnlyConfig(bits=8, group_size=None, method="rtn", keep_grid=False),
        "qcompile w4a16 g128 rtn": WeightOnlyConfig(method="rtn", **G128),
        "qcompile w4a16 g128 gptq": WeightOnlyConfig(method="gptq", **G128),
        "qcompile w4a16 g128 gptq act-order": WeightOnlyConfig(method="gptq", act_order=True, **G128),
        "qcompile w4a16 g128 gptq act-order clip": WeightOnlyConfig(method="gptq", act_order=True, clip_search=True, **G128),
        "qcompile w4a16 g128 gptq act-order clip damp 0.1": WeightOnlyConfig(
            method="gptq", act_order=True, clip_search=True, damp=0.1, **G128),
        "qcompile w4a16 g128 awq": WeightOnlyConfig(method="awq", **G128),
        "qcompile w4a16 g128 auto (default method)": WeightOnlyConfig(**G128),
        "qcompile w3a16 g128 gptq": WeightOnlyConfig(bits=3, method="gptq", **G128),
        "qcompile w4a16 per-channel rtn": WeightOnlyConfig(group_size=None, method="rtn", keep_grid=False),
        "qcompile w4a16 per-channel kmeans": WeightOnlyConfig(group_size=None, method="kmeans", keep_grid=False),
    }


def _compile_child(float_path, path, config, calib, queue) -> None:
    result = compile_model(float_path, path, config, feeds=lambda: iter(calib), progress=False)
    queue.put((result.seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def _measured_compile(float_path: Path, path: Path, config: WeightOnlyConfig, calib: list) -> dict:
    """Compile in a child process: its peak RSS is the compile's own."""
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(
        target=_compile_child, args=(float_path, path, config, calib, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        return {"error": f"compile failed (exit {child.exitcode})"}
    seconds, peak = queue.get()
    return {"path": path, "compile_s": seconds, "peak GB": peak / 1e9}


def _ort_int4(float_path: Path, path: Path, block_size: int) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    start = time.perf_counter()
    try:
        quantizer = MatMulNBitsQuantizer(str(float_path), bits=4, block_size=block_size, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    except Exception as exc:  # the baseline tool's own failure is a result too
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return {"path": path, "compile_s": time.perf_counter() - start}


def build_variants(name: str, float_path: Path, work: Path) -> dict[str, dict]:
    calib = models.data.model_feeds(name, "calib", base.CALIB_SAMPLES[name])
    out = {"fp32": {"path": float_path, "compile_s": 0.0}}
    for label, config in qcompile_variants(name).items():
        path = work / f"{name}.{label.split(' (')[0].replace(' ', '_')}.onnx"
        out[label] = _measured_compile(float_path, path, config, calib)
        print(f"  {label}: {out[label].get('compile_s', 0):.0f}s", flush=True)
    block = 32 if name == "minilm" else 128
    out[f"ORT MatMulNBitsQuantizer RTN block {block}"] = _ort_int4(float_path, work / f"{name}.ort-int4.onnx", block)
    return out


def _peak_memory(rows: list[dict]) -> str:
    return "\n\nCompile peak memory (child process RSS): " + ", ".join(
        f"{r['model']} {r['variant']} {r['compile peak GB']:.2f} GB" for r in rows if "compile peak GB" in r)


def main() -> None:
    base.run(__doc__.splitlines()[0], ["smollm2", "minilm"], build_variants, RESULTS, _peak_memory)


if __name__ == "__main__":
    main()
