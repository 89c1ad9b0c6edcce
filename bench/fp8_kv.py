"""FP8 (E4M3) Q/DQ and 8-bit KV cache on SmolLM2-135M: perplexity, cache bytes, (GPU timing owed).

* ``--fp8`` on the cache-free export (``models path smollm2``), calibrated on the calibration
  split, perplexity on 16 held-apart windows × 512 tokens against fp32 (ONNX Runtime's CPU
  provider runs the Q/DQ graph: the numbers an fp8 engine should reproduce).
* ``--kv-cache int8|fp8`` on the decoder export (``models path smollm2-decode``), perplexity
  token by token over held-apart windows (the 8-bit cache fed back every step), and the bytes
  one token adds to the cache.
* GPU section (ONNX Runtime's CUDA provider, H100): fp8 Q/DQ vs GemmFloat8 vs fp32 latency.
  Runs only where the CUDA provider is available; on this CPU machine it is recorded as owed.

Writes ``bench/results/fp8_kv.{json,md}``.

    python bench/fp8_kv.py [--work out/bench/fp8_kv] [--decode-windows 4] [--skip-fp8] [--skip-kv]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import models  # noqa: E402
import models.data  # noqa: E402
from qcompiler import decode_eval, evaluate  # noqa: E402
from qcompiler.config import CalibrationConfig, FP8Config, KVCacheConfig  # noqa: E402
from qcompiler.pipeline import compile_model, model_file_bytes  # noqa: E402
from runtime.session import create_session  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CALIB_SAMPLES = 16  # as bench/w8a8.py for SmolLM2 (the README's CLI figure uses 32)
EVAL_WINDOWS = 16


MINMAX = CalibrationConfig(method="minmax")


def _fp8_variants() -> dict[str, FP8Config]:
    # --method rtn and an fp8 LM head were measured on 4 windows while choosing the defaults
    # (README); on the shared 2-core machine each compile here takes ~10 minutes.
    # The bench's last run measured the searched-scales variant (search_scales, off by default).
    return {"fp8 (per-channel, GPTQ, searched scales, minmax; LM head float)":
            FP8Config(calibration=MINMAX, search_scales=True)}


def _ops(path: Path) -> dict[str, int]:
    model = onnx.load(path, load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def fp8_rows(work: Path, reuse: Path | None = None) -> list[dict]:
    """``reuse``: an already compiled default ``--fp8`` model to evaluate instead of compiling
    the default variant again (the shared machine takes ~15 minutes per compile)."""
    ref = models.export("smollm2")
    tokenizer = models.load_tokenizer("smollm2")
    calib = models.data.model_feeds("smollm2", "calib", CALIB_SAMPLES)
    windows = [{"input_ids": w} for w in models.data.lm_windows(tokenizer, "eval", n=EVAL_WINDOWS)]
    float_ppl = evaluate.perplexity(create_session(ref.onnx_path, threads=2), windows)
    rows = [{"variant": "fp32", "bytes": model_file_bytes(ref.onnx_path), "perplexity": float_ppl, "ratio": 1.0}]
    print(f"fp32 perplexity {float_ppl:.4f}", flush=True)
    for name, config in _fp8_variants().items():
        out = work / ("".join(c for c in name if c.isalnum() or c in "-_") + ".onnx")
        if reuse is not None:
            out, seconds = reuse, None
        else:
            seconds = round(compile_model(ref.onnx_path, out, config, feeds=lambda: calib, progress=False).seconds, 1)
        ppl = evaluate.perplexity(create_session(out, threads=2), windows)
        ops = _ops(out)
        rows.append({"variant": name + (f" ({out.name}, compiled beforehand)" if reuse else ""),
                     "bytes": model_file_bytes(out), "compile_s": seconds,
                     "perplexity": ppl, "ratio": ppl / float_ppl,
                     "qdq": {k: ops.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear", "MatMul")}})
        print(f"{name}: perplexity {ppl:.4f} ratio {ppl / float_ppl:.4f}", flush=True)
    # ort-cuda: GemmFloat8 (TN layout): built and checked for structure here; its numbers and
    # timing need the CUDA provider (owed).
    # (rounded to nearest here to spare the shared machine a second GPTQ: the graph is the same)
    cuda = FP8Config(calibration=MINMAX, target="ort-cuda", method="rtn")
    out = work / "fp8-ort-cuda.onnx"
    result = compile_model(ref.onnx_path, out, cuda, feeds=lambda: calib, progress=False)
    ops = _ops(out)
    rows.append({"variant": "fp8 --target ort-cuda (GemmFloat8, transB=1)", "bytes": result.output_bytes,
                 "compile_s": round(result.seconds, 1), "perplexity": None, "ratio": None,
                 "gemm_float8": ops.get("GemmFloat8", 0), "matmul_left": ops.get("MatMul", 0),
                 "note": "CPU provider has no GemmFloat8 kernel: run on an H100 (owed)"})
    return rows


KV_VARIANTS = {"fp32 cache": None, "int8 cache": "int8", "fp8 cache": "fp8", "fp8 model (--fp8) + fp8 cache": "fp8+fp8"}
FP32_CACHE_BYTES = 30 * 2 * 3 * 64 * 4  # SmolLM2: layers × (k, v) × kv heads × head_dim × float32


def kv_rows(work: Path, n_windows: int, length: int, only: list[str], previous: list[dict]) -> list[dict]:
    """Token-by-token rows for the variants in ``only`` (names of ``KV_VARIANTS``); rows of
    the others are kept from ``previous``. Ratios are to the fp32 cache row."""
    ref = models.export("smollm2-decode")
    tokenizer = models.load_tokenizer("smollm2")
    windows = [w[:, :length] for w in models.data.lm_windows(tokenizer, "eval", n=n_windows)]
    rows = {r["variant"]: r for r in previous if r["variant"] in KV_VARIANTS}
    for name in only:
        dtype = KV_VARIANTS[name]
        path = ref.onnx_path
        if dtype == "fp8+fp8":
            path = work / "decode.fp8.kv-fp8.onnx"
            compile_model(ref.onnx_path, path, FP8Config(calibration=CalibrationConfig(method="minmax")),
                          feeds=lambda: _decoder_feeds(ref.onnx_path), progress=False, kv_cache=KVCacheConfig("fp8"))
        elif dtype is not None:
            path = work / f"decode.kv-{dtype}.onnx"
            compile_model(ref.onnx_path, path, KVCacheConfig(dtype), progress=False)
        start = time.perf_counter()
        result = decode_eval.decode_perplexity(path, windows)
        rows[name] = {"variant": name, "perplexity": result.perplexity, "tokens": result.tokens,
                      "windows": result.windows, "cache_bytes_per_token": result.cache_bytes_per_token,
                      "vs_fp16_cache": result.cache_bytes_per_token / (FP32_CACHE_BYTES / 2),
                      "ms_per_step": result.ms_per_step, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: perplexity {result.perplexity:.4f} {result.cache_bytes_per_token} B/token", flush=True)
    base = rows["fp32 cache"]["perplexity"]
    ordered = [rows[n] for n in KV_VARIANTS if n in rows]
    for row in ordered:
        row["ratio"] = row["perplexity"] / base
    ordered.insert(1, {"variant": "fp16 cache (bytes only)", "cache_bytes_per_token": FP32_CACHE_BYTES // 2,
                       "vs_fp16_cache": 1.0})
    return ordered


def _decoder_feeds(path: Path) -> list[dict]:
    """Calibration windows as prefill feeds of the decoder (an empty cache)."""
    import numpy as np

    names = [i.name for i in onnx.load(path, load_external_data=False).graph.input if i.name.startswith("past")]
    feeds = []
    for feed in models.data.model_feeds("smollm2", "calib", CALIB_SAMPLES):
        ids = feed["input_ids"]
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                      **{n: np.zeros((ids.shape[0], 3, 0, 64), np.float32) for n in names}})
    return feeds


def gpu_section(work: Path) -> dict:
    """The H100 timings (owed): fp32 vs fp8 Q/DQ vs GemmFloat8, CUDA provider, 1×512 tokens."""
    kernels = RESULTS / "fp8_gemm_cuda.json"  # bench/fp8_gemm_cuda.py, run on the GPU machine (torch)
    kernel_totals = json.loads(kernels.read_text())["totals"] if kernels.exists() else None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"status": "owed", "why": "no CUDA provider here (onnxruntime CPU build; the lent H100 has "
                "onnxruntime 1.30 CPU too): ONNX Runtime CUDA timings of the fp8 Q/DQ and GemmFloat8 graphs "
                "need onnxruntime-gpu on an H100", "cublaslt_fp8_gemm_us": kernel_totals}
    import numpy as np

    ref = models.export("smollm2")
    feed = {"input_ids": np.arange(1, 513, dtype=np.int64).reshape(1, 512)}
    paths = {"fp32": ref.onnx_path, "fp8 qdq": work / "fp8per-channelGPTQsearchedscalesminmaxLMheadfloat.onnx",
             "fp8 GemmFloat8": work / "fp8-ort-cuda.onnx"}
    sessions, failed = {}, {}
    for name, path in paths.items():
        try:
            sessions[name] = create_session(path, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
        except Exception as exc:  # a refusal is a result too (GemmFloat8 layouts)
            failed[name] = str(exc).splitlines()[0]
    times = evaluate.interleaved_latency(sessions, feed, runs=20) if sessions else {}
    return {"status": "measured", "ms_1x512": times, "failed": failed}


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key)
            cells.append("–" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench" / "fp8_kv")
    parser.add_argument("--decode-windows", type=int, default=4)
    parser.add_argument("--decode-length", type=int, default=512)
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--skip-kv", action="store_true")
    parser.add_argument("--fp8-model", type=Path, help="evaluate this compiled default --fp8 model instead of compiling it")
    parser.add_argument("--kv-variants", default=",".join(KV_VARIANTS),
                        help="comma-separated KV variants to run (the others keep their last results)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # Sections not run this time (--skip-…, --kv-variants) keep their last results, read back
    # just before writing.
    previous = RESULTS / "fp8_kv.json"

    def last() -> dict:
        return json.loads(previous.read_text()) if previous.exists() else {}

    computed = {}
    if not args.skip_fp8:
        computed["fp8"] = fp8_rows(args.work, args.fp8_model)
    if not args.skip_kv:
        only = [v for v in args.kv_variants.split(",") if v]
        unknown = set(only) - set(KV_VARIANTS)
        if unknown:
            parser.error(f"unknown KV variants {sorted(unknown)}; choose from {list(KV_VARIANTS)}")
        computed["kv_cache"] = kv_rows(args.work, args.decode_windows, args.decode_length, only,
                                       last().get("kv_cache", []))
    payload = last() | computed
    payload["machine"] = (f"{platform.machine()}, {__import__('os').cpu_count()} cores, "
                          f"onnxruntime {ort.__version__} CPU, 2 threads")
    payload["gpu"] = gpu_section(args.work)
    md = [f"Machine: {payload['machine']}.", ""]
    if "fp8" in payload:
        md += [f"**SmolLM2-135M `--fp8`** ({EVAL_WINDOWS} held-apart windows × 512, calibration "
               f"{CALIB_SAMPLES} windows)", ""]
        md += _table(payload["fp8"], [("variant", "variant"), ("bytes", "bytes"), ("perplexity", "perplexity"),
                                      ("ratio to fp32", "ratio"), ("GemmFloat8", "gemm_float8")])
        md.append("")
    if "kv_cache" in payload:
        kv = payload["kv_cache"][0]
        md += [f"**SmolLM2-135M decoder, KV cache** (token by token, {kv['windows']} held-apart "
               f"windows, {kv['tokens']} predicted tokens)", ""]
        md += _table(payload["kv_cache"], [("cache", "variant"), ("perplexity", "perplexity"),
                                           ("ratio to fp32 cache", "ratio"), ("bytes/token", "cache_bytes_per_token"),
                                           ("vs fp16", "vs_fp16_cache"), ("ms/step", "ms_per_step")])
        md.append("")
    md.append(f"**GPU (H100)**: {json.dumps(payload['gpu'])}")
    text = "\n".join(md) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fp8_kv.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "fp8_kv.md").write_text(text)


if __name__ == "__main__":
    main()
