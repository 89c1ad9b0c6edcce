"""Sensitivity benchmark: does `qcompile diff --data` rank the layers that matter, and does
`--max-ppl-increase` meet its target on held-apart data?

SmolLM2-135M, W8A8 with static per-tensor activations (16 calibration windows × 512 tokens;
perplexity on 16 held-apart windows × 512 tokens; ONNX Runtime CPU, 2 threads):

1. Without SmoothQuant: rank the quantized layers by `diff --data` (SQNR at each layer's
   output, 4 calibration windows), then compile again with the top-k layers kept in float and
   with k random layers kept in float (two seeds), k = 5, 10, 21 (21 = 10% of 211 MatMuls).
2. `--max-ppl-increase 1` with SmoothQuant and without it: the default (α searched for the
   per-token rung; sensitive layers to per-token activations first, then float), `--fallback
   float` (α = 0.8 with SmoothQuant; cap raised to 50% without): how many layers go per-token
   and float, and the held-apart perplexity. The target's 8 samples (spread over the
   calibration windows) are held apart from the ranges' 16 windows.

Writes ``bench/results/sensitivity.{json,md}``.

    python bench/sensitivity.py [--ks 5 10 21] [--work out/bench] [--targets-only] [--targets default ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import w8a8 as base  # noqa: E402

import models  # noqa: E402
import models.data  # noqa: E402

from qcompiler import diff, eval_data, evaluate  # noqa: E402
from qcompiler.config import W8A8Config  # noqa: E402
from qcompiler.pipeline import compile_model  # noqa: E402
from qcompiler.sensitivity import Objective  # noqa: E402
from runtime.session import create_session  # noqa: E402

CALIB_WINDOWS = 16
RANK_WINDOWS = 4
TARGET_WINDOWS = W8A8Config.sensitivity_samples  # held apart from the ranges by the target
_TARGET = Objective("ppl", 1.0)
TARGET_ROWS = {  # part 2
    "default": ("--max-ppl-increase 1 (default: SmoothQuant, per-token rung)", W8A8Config(
        activations="static", accuracy_target=_TARGET)),
    "alpha-float": ("--max-ppl-increase 1, SmoothQuant α=0.8, --fallback float", W8A8Config(
        activations="static", smoothquant_alpha=0.8, accuracy_target=_TARGET, fallback="float")),
    "no-sq": ("--max-ppl-increase 1, no SmoothQuant", W8A8Config(
        activations="static", smoothquant=False, accuracy_target=_TARGET)),
    "no-sq-float": ("--max-ppl-increase 1, no SmoothQuant, --fallback float (cap 50%)", W8A8Config(
        activations="static", smoothquant=False, accuracy_target=_TARGET, max_float_fraction=0.5,
        fallback="float")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 21])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=base.ROOT / "out" / "bench")
    parser.add_argument("--results", type=Path, default=base.ROOT / "bench" / "results")
    parser.add_argument("--targets-only", action="store_true",
                        help="redo part 2 only, keeping part 1's rows from the last results")
    parser.add_argument("--targets", nargs="+", choices=list(TARGET_ROWS), default=list(TARGET_ROWS),
                        help="which rows of part 2 to run (default: all)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    float_path = models.export("smollm2").onnx_path
    calib = models.data.model_feeds("smollm2", "calib", CALIB_WINDOWS)
    target_calib = models.data.model_feeds("smollm2", "calib", CALIB_WINDOWS + TARGET_WINDOWS)
    held = eval_data.default_eval_data("lm").feeds
    state = {"machine": base.machine(), "rows": [], "ranking": []}

    def ppl(path: Path) -> float:
        return evaluate.perplexity(create_session(path, threads=base.THREADS), held)

    float_ppl = ppl(float_path)

    def record(label: str, path: Path, seconds: float, **extra) -> None:
        value = ppl(path)
        state["rows"].append({"variant": label, "perplexity": value, "ratio": value / float_ppl,
                              "compile_s": round(seconds, 1), **extra})
        print(f"{label:<55} ppl {value:.3f}  ×{value / float_ppl:.4f}  {extra}", flush=True)
        (args.results / "sensitivity.json").write_text(json.dumps(state, indent=2, default=float))
        (args.results / "sensitivity.md").write_text(markdown(state, float_ppl))

    def build(label: str, config: W8A8Config, calib: list[dict] = calib, **extra) -> Path:
        path = args.work / f"smollm2.sens.{label.replace(' ', '_').replace('/', '').replace(',', '')}.onnx"
        start = time.perf_counter()
        compile_model(float_path, path, config, feeds=lambda: iter(calib), progress=False)
        record(label, path, time.perf_counter() - start, **extra)
        return path

    if args.targets_only:
        previous = json.loads((args.results / "sensitivity.json").read_text())
        # Part 1's rows, and part 2's rows not run again now (labels still in TARGET_ROWS).
        kept = {TARGET_ROWS[k][0] for k in TARGET_ROWS if k not in args.targets}
        state["rows"] = [r for r in previous["rows"]
                         if not r["variant"].startswith("--max-ppl-increase") or r["variant"] in kept]
        state["ranking"] = previous["ranking"]
    else:
        rank_and_ablate(args, calib, float_path, build, state)
    for label, config in (TARGET_ROWS[key] for key in args.targets):
        try:  # the target's samples are held apart: the ranges still see CALIB_WINDOWS windows
            path = build(label, config, calib=target_calib)
        except Exception as exc:  # the target not met is a result too
            state["rows"].append({"variant": label, "error": str(exc)})
            print(f"{label}: {exc}", flush=True)
            continue
        decision = json.loads(dict((p.key, p.value) for p in __import__("onnx").load(
            path, load_external_data=False).metadata_props)["qcompile.kept_float"])
        row = state["rows"][-1]
        row["floated"] = len(decision["kept_float"])
        row["per_token"] = len(decision["per_token"])
        row["layers"] = {"float": [d["node"] for d in decision["kept_float"]],
                         "per-token": [d["node"] for d in decision["per_token"]]}
        row["calibration loss"] = decision["loss_by_choice"]
        (args.results / "sensitivity.json").write_text(json.dumps(state, indent=2, default=float))
        (args.results / "sensitivity.md").write_text(markdown(state, float_ppl))
    (args.results / "sensitivity.json").write_text(json.dumps(state, indent=2, default=float))
    (args.results / "sensitivity.md").write_text(markdown(state, float_ppl))
    print(markdown(state, float_ppl))


def rank_and_ablate(args, calib: list[dict], float_path: Path, build, state: dict) -> None:
    """Part 1: rank by `diff --data`, then top-k against random k in float."""
    plain = W8A8Config(activations="static", smoothquant=False)
    base_path = build("static, no SmoothQuant", plain)
    report = diff.diff_models(float_path, base_path)
    rows, _ = diff.numeric_diff(report, itertools.islice(iter(calib), RANK_WINDOWS), base.THREADS)
    state["ranking"] = [{"node": r.node, "layer": r.layer, "own_sqnr_db": r.local_sqnr_db, "sqnr_db": r.sqnr_db}
                        for r in rows]
    ranked = [r.node for r in rows]
    for k in args.ks:
        build(f"top-{k} by diff in float", W8A8Config(activations="static", smoothquant=False, exclude=tuple(ranked[:k])),
              floated=k, layers=[r.layer for r in rows[:k]])
        for seed in range(args.seeds):
            chosen = random.Random(seed).sample(ranked, k)
            build(f"random {k} in float (seed {seed})", W8A8Config(activations="static", smoothquant=False,
                                                                  exclude=tuple(chosen)), floated=k)


def markdown(state: dict, float_ppl: float) -> str:
    lines = [f"# Sensitivity: SmolLM2-135M W8A8 static ({state['machine']})", "",
             f"fp32 perplexity {float_ppl:.3f} on 16 held-apart windows × 512 tokens; "
             f"{CALIB_WINDOWS} calibration windows; ranking by `diff --data` on {RANK_WINDOWS} of them.", "",
             "| variant | layers in float | per-token layers | perplexity | ratio to fp32 | compile s |",
             "|---|---|---|---|---|---|"]
    for row in state["rows"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | — | — | {row['error']} | | |")
            continue
        lines.append(f"| {row['variant']} | {row.get('floated', 0)} | {row.get('per_token', 0)} | "
                     f"{row['perplexity']:.3f} | {row['ratio']:.4f} | {row['compile_s']} |")
    if state["ranking"]:
        lines += ["", "Worst 10 layers by `diff --data` (ranked by own SQNR; shown: SQNR accumulated at the "
                  "layer's output):", ""]
        lines += [f"- {r['layer']}: {r['sqnr_db']:.1f} dB" for r in state["ranking"][:10]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
