"""Bounded memory: peak RSS of a static W8A8 compile of SmolLM2 with 8 and with 128 calibration
windows (512 tokens each). Calibration statistics are streamed (one pass, histograms and
per-channel min/max/mean, a fixed-size row sample), so the peak should not grow with the number
of windows (bar: < 10% apart).

    python bench/memory.py [--counts 8 128]

Each compile runs in its own process under a tiny wrapper that reports that process's peak RSS
(``os.wait4``). Writes ``bench/results/memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.large_model import run_with_rss  # noqa: E402

RESULTS = ROOT / "bench" / "results"
QCOMPILE = str(ROOT / ".venv" / "bin" / "qcompile")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[8, 128])
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    model = subprocess.run([QCOMPILE, "models", "path", args.model], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    work = Path(tempfile.mkdtemp(prefix="qcompile-memory-"))
    try:
        full = work / "calib"
        subprocess.run([QCOMPILE, "models", "data", args.model, "--split", "calib", "-o", str(full),
                        "-n", str(max(args.counts))], cwd=ROOT, check=True, capture_output=True)
        files = sorted(full.glob("*.npz"))
        rows = []
        for count in args.counts:
            folder = work / f"calib{count}"
            folder.mkdir()
            for f in files[:count]:
                os.symlink(f, folder / f.name)
            out = work / f"out{count}.onnx"
            result = run_with_rss([QCOMPILE, model, "--w8a8", "--calib-data", str(folder), "-o", str(out), "--quiet"])
            if result["rc"] != 0:
                raise SystemExit(f"compile with {count} windows failed: {result['err']}")
            rows.append({"windows": count, "peak_rss_gb": round(result["peak_rss_bytes"] / 1e9, 3),
                         "seconds": round(result["seconds"], 1)})
            print(rows[-1], flush=True)
        lo, hi = min(r["peak_rss_gb"] for r in rows), max(r["peak_rss_gb"] for r in rows)
        payload = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), ONNX Runtime "
                       f"{__import__('onnxruntime').__version__} CPU",
            "model": args.model, "recipe": "--w8a8 --calib-data DIR (static per-tensor, SmoothQuant auto)",
            "rows": rows, "spread": round(hi / lo - 1, 4), "bar": "< 10% apart",
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "memory.json").write_text(json.dumps(payload, indent=2) + "\n")
        lines = [f"{args.model} static W8A8 calibration, {payload['machine']}.", "",
                 "| calibration windows (×512 tokens) | peak RSS GB | compile s |", "|---|---|---|"]
        lines += [f"| {r['windows']} | {r['peak_rss_gb']} | {r['seconds']} |" for r in rows]
        lines += ["", f"Spread: {payload['spread'] * 100:.1f}% (bar: < 10%)."]
        (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
