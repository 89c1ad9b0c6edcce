"""W8A8 benchmark: fp32, qcompile's W8A8 variants and onnxruntime.quantization, in one run.

For each reference model (all-MiniLM-L6-v2, MobileNetV2, SmolLM2-135M) it compiles every
variant from the same calibration split, evaluates all of them on the same held-apart split with
qcompile's evaluation harness, and times them interleaved (ONNX Runtime CPU provider, 2 threads,
median). Prints a markdown table and writes ``bench/results/w8a8.json`` and ``w8a8.md``.

    python bench/w8a8.py [--models minilm mobilenetv2 smollm2] [--work out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import models.data  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType  # noqa: E402
from onnxruntime.quantization import quantize_dynamic, quantize_static  # noqa: E402

from qcompiler import eval_data, evaluate  # noqa: E402
from qcompiler.config import CalibrationConfig, W8A8Config  # noqa: E402
from qcompiler.pipeline import compile_model, model_file_bytes  # noqa: E402
from runtime.session import create_session  # noqa: E402

THREADS = 2
VERIFY_SAMPLES = 4  # calibration samples for the op-by-op lowering check
# Interleaved timing runs per shape; the machine is shared (its run times vary 2× between runs),
# so many runs and the median.
LATENCY_RUNS = {"embedding": 60, "image": 60, "lm": 20}
# Calibration samples per model (the calibration split; never evaluated on).
CALIB_SAMPLES = {"minilm": 188, "mobilenetv2": 200, "smollm2": 16}
# ORT's calibrator keeps every activation of every sample in memory: fewer windows for the LM.
ORT_STATIC_SAMPLES = {"minilm": 64, "mobilenetv2": 64, "smollm2": 4}
TASK = {"minilm": "embedding", "mobilenetv2": "image", "smollm2": "lm"}


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def qcompile_variants(name: str) -> dict[str, W8A8Config]:
    """qcompile's variants; "static" is the default target ort-cpu (integer kernels)."""
    variants = {"qcompile static": W8A8Config(activations="static", calibration=CalibrationConfig())}
    if name == "mobilenetv2":
        variants["qcompile static --float-residuals"] = W8A8Config(
            activations="static", float_residuals=True)
    # The portable QDQ output, here run by ONNX Runtime (which fuses QDQ itself).
    variants["qcompile static --target qdq"] = W8A8Config(activations="static", target="qdq")
    if name != "mobilenetv2":  # dynamic schemes lower MatMul/Gemm only; convs stay float
        variants["qcompile per-token"] = W8A8Config(activations="per-token")
        variants["qcompile per-token-sym"] = W8A8Config(activations="per-token-sym")
        variants["qcompile dynamic"] = W8A8Config(activations="dynamic")
    return variants


def build_variants(name: str, float_path: Path, work: Path) -> dict[str, dict]:
    """Compile every variant; returns {label: {"path", "compile_s"}}."""
    calib = models.data.model_feeds(name, "calib", CALIB_SAMPLES[name])
    out = {"fp32": {"path": float_path, "compile_s": 0.0}}
    for label, config in qcompile_variants(name).items():
        path = work / f"{name}.{label.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        lowered = config.activations == "static" and config.target == "ort-cpu"
        result = compile_model(float_path, path, config, feeds=lambda: iter(calib), progress=False,
                               verify_samples=VERIFY_SAMPLES if lowered else 0)
        out[label] = {"path": path, "compile_s": result.seconds}
        if result.verification is not None:  # op by op against the QDQ stage (--verify)
            out[label]["lowering steps"] = max(c.max_error for c in result.verification.ops)
    baselines = {
        "ORT quantize_dynamic": lambda path: quantize_dynamic(
            float_path, path, per_channel=True, weight_type=QuantType.QInt8),
        "ORT quantize_static": lambda path: quantize_static(
            float_path, path, _Reader(calib[: ORT_STATIC_SAMPLES[name]]), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
    }
    for label, quantize in baselines.items():
        path = work / f"{name}.{label.split()[1]}.onnx"
        start = time.perf_counter()
        try:
            quantize(path)
        except Exception as exc:  # the baseline tool's own failure is a result too
            out[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            continue
        out[label] = {"path": path, "compile_s": time.perf_counter() - start}
    return out


def evaluate_variants(name: str, variants: dict[str, dict]) -> list[dict]:
    task = TASK[name]
    data = eval_data.default_eval_data(task)
    failed = [{"model": name, "variant": label, "error": v["error"]} for label, v in variants.items() if "error" in v]
    variants = {label: v for label, v in variants.items() if "error" not in v}
    sessions = {label: create_session(v["path"], threads=THREADS) for label, v in variants.items()}
    rows = []
    for label, v in variants.items():
        row = {"model": name, "variant": label, "bytes": model_file_bytes(Path(v["path"])),
               "compile_s": round(v["compile_s"], 1)}
        if "lowering steps" in v:
            row["lowering steps"] = v["lowering steps"]
        if "peak GB" in v:
            row["compile peak GB"] = round(v["peak GB"], 2)
        if task == "embedding":
            row.update(evaluate.embedding_metrics(sessions["fp32"], sessions[label], data.feeds, data.padded))
        elif task == "lm":
            row["perplexity"] = evaluate.perplexity(sessions[label], data.feeds)
        else:
            row.update(evaluate.image_metrics(sessions["fp32"], sessions[label], data.feeds, data.labelled))
        rows.append(row)
    if task == "lm":
        base = rows[0]["perplexity"]
        for row in rows:
            row["perplexity ratio"] = row["perplexity"] / base
    for shape, feed in data.latency_feeds.items():
        times = evaluate.interleaved_times(sessions, feed, runs=LATENCY_RUNS[task])
        median = {k: float(np.median(t)) for k, t in times.items()}
        best = {k: float(np.min(t)) for k, t in times.items()}
        for row in rows:
            row[f"ms {shape}"] = median[row["variant"]]
            row[f"speed-up {shape}"] = median["fp32"] / median[row["variant"]]
            row[f"best ms {shape}"] = best[row["variant"]]
            row[f"best speed-up {shape}"] = best["fp32"] / best[row["variant"]]
    return rows + failed


# Per task: (heading, [(column title, row key, format)]).
LOWERING = ("lowering Δ", "lowering steps", "{:.0f}")
COLUMNS = {
    "embedding": ("all-MiniLM-L6-v2 (552 held-apart sentences; padded = batches of 32)", [
        ("mean cos", "mean cosine (unpadded)", "{:.4f}"), ("min cos", "min cosine (unpadded)", "{:.4f}"),
        ("mean cos padded", "mean cosine (padded batch)", "{:.4f}"),
        ("NN agree", "nearest-neighbour agreement", "{:.3f}"),
        ("ms 1×128", "ms 1×128 tokens", "{:.1f}"), ("speed-up", "speed-up 1×128 tokens", "{:.2f}×"),
        ("best", "best speed-up 1×128 tokens", "{:.2f}×"),
        ("ms 32×128", "ms 32×128 tokens", "{:.0f}"), ("speed-up", "speed-up 32×128 tokens", "{:.2f}×"),
        ("best", "best speed-up 32×128 tokens", "{:.2f}×"),
        LOWERING]),
    "image": ("MobileNetV2 (8 held-apart photos × 20 crops; 6 labelled photos)", [
        ("top-1 agreement", "top-1 agreement", "{:.3f}"),
        ("labelled top-1", "top-1 accuracy quant (labelled photos)", "{:.3f}"),
        ("ms batch 1", "ms batch 1", "{:.1f}"), ("speed-up", "speed-up batch 1", "{:.2f}×"),
        ("best", "best speed-up batch 1", "{:.2f}×"),
        ("ms batch 16", "ms batch 16", "{:.0f}"), ("speed-up", "speed-up batch 16", "{:.2f}×"),
        ("best", "best speed-up batch 16", "{:.2f}×"),
        LOWERING]),
    "lm": ("SmolLM2-135M (16 held-apart windows × 512 tokens of Wikipedia)", [
        ("perplexity", "perplexity", "{:.2f}"), ("ratio to fp32", "perplexity ratio", "{:.4f}"),
        ("ms 1×512", "ms 1×512 tokens", "{:.0f}"), ("speed-up", "speed-up 1×512 tokens", "{:.2f}×"),
        ("best", "best speed-up 1×512 tokens", "{:.2f}×"),
        LOWERING]),
}


def markdown(rows: list[dict], machine: str) -> str:
    """One table per model: variant, size, compile time and the task's columns."""
    lines = [f"Machine: {machine}; accuracy against fp32 on held-apart data, latency interleaved "
             "(ms and speed-up: median; best: speed-up of the fastest runs, the machine being shared). "
             "\"static\" is the default target ort-cpu (integer kernels); lowering Δ: "
             "worst op-by-op difference from its QDQ stage (--verify), in quantization steps."]
    for name in dict.fromkeys(r["model"] for r in rows):
        heading, columns = COLUMNS[TASK[name]]
        lines += ["", f"**{heading}**", "",
                  "| variant | size | compile s | " + " | ".join(c[0] for c in columns) + " |",
                  "|---|---|---|" + "---|" * len(columns)]
        for r in (r for r in rows if r["model"] == name):
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: `{r['error'][:100]}` |" + " |" * (len(columns) + 1))
                continue
            cells = [fmt.format(r[key]) if key in r else "–" for _, key, fmt in columns]
            lines.append(f"| {r['variant']} | {r['bytes'] / 1e6:.1f} MB | {r['compile_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"ONNX Runtime {ort.__version__} CPU, {THREADS} threads")


def run(description: str, default_models: list[str], build, results: str, footer=None) -> None:
    """A benchmark's command line: compile each model's variants with ``build(name, float_path,
    work)``, evaluate them, write ``bench/results/<results>.{json,md}`` after each model.
    ``footer(rows)``: extra Markdown under the tables."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=default_models)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--render", action="store_true", help=f"only rebuild {results}.md from {results}.json")
    args = parser.parse_args()
    json_path, md_path = args.results / f"{results}.json", args.results / f"{results}.md"
    if args.render:
        saved = json.loads(json_path.read_text())
        md_path.write_text(markdown(saved["rows"], saved["machine"]) + (footer(saved["rows"]) if footer else "") + "\n")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        print(f"[{name}] exporting / compiling", flush=True)
        variants = build(name, models.export(name).onnx_path, args.work)
        print(f"[{name}] evaluating", flush=True)
        rows += evaluate_variants(name, variants)
        table = markdown(rows, machine()) + (footer(rows) if footer else "")
        json_path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2, default=float))
        md_path.write_text(table + "\n")
    print(table)


def main() -> None:
    run(__doc__.splitlines()[0], ["minilm", "mobilenetv2", "smollm2"], build_variants, "w8a8")


if __name__ == "__main__":
    main()
