"""Models over protobuf's 2 GB limit: build a synthetic decoder with > 2.2 GB of fp32 weights in
an external data file (written tensor by tensor: no protobuf ever holds the weights), compile it
with ``--w8a8`` (dynamic per-token) and ``--w4a16 --method rtn``, run the float model and both
outputs in ONNX Runtime, and report each compile's peak RSS (its own process, ``os.wait4``)
against the model's size on disk (bar: ≤ 1.5×).

    python bench/large_model.py [--layers 17] [--hidden 2048] [--ffn 8192] [--keep]

Layer ``i`` (pre-norm MLP block)::

    h = x / sqrt(mean(x²) + ε) · γ_i          (RMSNorm-ish)
    x = x + (Relu(h W_up_i + b_i)) W_down_i

Writes ``bench/results/large_model.json`` and ``.md``; deletes the big files afterwards unless
``--keep``.
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
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OPSET = 18


def _external(name: str, shape: tuple[int, ...], data_file, location: str) -> TensorProto:
    """Generate one fp32 weight, append it to ``data_file``, return a proto that points at it."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    array = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
    offset = data_file.tell()
    data_file.write(array.tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build(folder: Path, layers: int, hidden: int, ffn: int) -> Path:
    """The decoder in ``folder/model.onnx`` + ``model.onnx.data``."""
    path = folder / "model.onnx"
    location = "model.onnx.data"
    nodes, inits = [], []
    x = "x"
    small = lambda name, array: inits.append(numpy_helper.from_array(array, name))  # noqa: E731
    small("eps", np.array(1e-6, np.float32))
    small("two", np.array(2.0, np.float32))
    with open(folder / location, "wb") as data:
        for i in range(layers):
            p = f"l{i}."
            small(p + "gamma", np.ones(hidden, np.float32))
            small(p + "b_up", np.zeros(ffn, np.float32))
            inits.append(_external(p + "w_up", (hidden, ffn), data, location))
            inits.append(_external(p + "w_down", (ffn, hidden), data, location))
            nodes += [
                helper.make_node("Pow", [x, "two"], [p + "sq"], name=p + "pow"),
                helper.make_node("ReduceMean", [p + "sq"], [p + "ms"], axes=[-1], keepdims=1, name=p + "mean")
                if OPSET < 18 else
                helper.make_node("ReduceMean", [p + "sq", "axes"], [p + "ms"], keepdims=1, name=p + "mean"),
                helper.make_node("Add", [p + "ms", "eps"], [p + "mse"], name=p + "addeps"),
                helper.make_node("Sqrt", [p + "mse"], [p + "rms"], name=p + "sqrt"),
                helper.make_node("Div", [x, p + "rms"], [p + "n"], name=p + "div"),
                helper.make_node("Mul", [p + "n", p + "gamma"], [p + "h"], name=p + "norm"),
                helper.make_node("MatMul", [p + "h", p + "w_up"], [p + "u"], name=p + "up"),
                helper.make_node("Add", [p + "u", p + "b_up"], [p + "ub"], name=p + "bias"),
                helper.make_node("Relu", [p + "ub"], [p + "a"], name=p + "relu"),
                helper.make_node("MatMul", [p + "a", p + "w_down"], [p + "d"], name=p + "down"),
                helper.make_node("Add", [x, p + "d"], [p + "out"], name=p + "residual"),
            ]
            x = p + "out"
    small("axes", np.array([-1], np.int64))
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "large_decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())  # a few KB: the weights are all external
    onnx.checker.check_model(str(path))
    return path


def disk_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.parent.iterdir()
               if f.name == model.name or f.name.startswith(model.name + "."))


def run_measured(argv: list[str]) -> dict:
    """Run ``argv``; its wall time, exit code, stdout/stderr and peak RSS (os.wait4: this child
    only)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    # communicate() has reaped it; the rusage of that child alone comes from a wrapper: see below.
    return {"rc": proc.returncode, "seconds": time.perf_counter() - start, "out": out, "err": err}


_WRAPPER = """
import os, resource, subprocess, sys, json
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(json.dumps({"maxrss_kb": usage.ru_maxrss, "status": os.waitstatus_to_exitcode(status)}) + "\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_with_rss(argv: list[str]) -> dict:
    """``argv`` in a child of a tiny wrapper that reports that child's peak RSS."""
    result = run_measured([sys.executable, "-c", _WRAPPER, *argv])
    last = result["err"].strip().splitlines()[-1]
    stats = json.loads(last)
    result["peak_rss_bytes"] = stats["maxrss_kb"] * 1024
    result["err"] = "\n".join(result["err"].strip().splitlines()[:-1])
    return result


_ORT_RUN = """
import sys, json, numpy as np, onnxruntime as ort
sys.path.insert(0, {root!r})
from runtime.session import create_session
x = np.random.default_rng(0).standard_normal((1, 16, {hidden}), dtype=np.float32)
outs = {{}}
for path in sys.argv[1:]:
    s = create_session(path, threads=2)
    outs[path] = s.run(None, {{"x": x}})[0]
    del s
ref = outs[sys.argv[1]]
res = {{}}
for path, y in outs.items():
    noise = np.linalg.norm(ref - y)
    res[path] = {{"finite": bool(np.isfinite(y).all()),
                 "sqnr_db": float(20 * np.log10(np.linalg.norm(ref) / noise)) if noise else float("inf")}}
print(json.dumps(res))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=17)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--dir", type=Path, help="Work folder (default: a temporary one beside the repo)")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="qcompile-large-", dir=ROOT.parent))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        model = build(work, args.layers, args.hidden, args.ffn)
        size = disk_bytes(model)
        weights = args.layers * 2 * args.hidden * args.ffn * 4
        print(f"built {model}: {size / 1e9:.3f} GB on disk ({weights / 1e9:.3f} GB fp32 weights) "
              f"in {time.perf_counter() - start:.0f}s", flush=True)
        qcompile = str(ROOT / ".venv" / "bin" / "qcompile")
        rows = []
        outputs = []
        for label, flags in (("--w8a8 (dynamic per-token)", ["--w8a8"]),
                             ("--w4a16 --method rtn", ["--w4a16", "--method", "rtn"])):
            out = work / ("w8a8.onnx" if "w8a8" in flags[0] else "w4a16.onnx")
            result = run_with_rss([qcompile, str(model), *flags, "-o", str(out), "--quiet"])
            if result["rc"] != 0:
                raise SystemExit(f"{label} failed: {result['err']}")
            out_size = disk_bytes(out)
            rows.append({
                "recipe": label,
                "compile_seconds": round(result["seconds"], 1),
                "peak_rss_gb": round(result["peak_rss_bytes"] / 1e9, 3),
                "rss_over_model_size": round(result["peak_rss_bytes"] / size, 3),
                "output_gb": round(out_size / 1e9, 3),
                "output_external_data": (out.parent / (out.name + ".data")).exists(),
                "output_protobuf_mb": round(out.stat().st_size / 1e6, 2),
            })
            outputs.append(out)
            print(f"{label}: {rows[-1]}", flush=True)
        ort = run_with_rss([sys.executable, "-c", _ORT_RUN.format(root=str(ROOT), hidden=args.hidden),
                            str(model), *map(str, outputs)])
        if ort["rc"] != 0:
            raise SystemExit(f"ONNX Runtime run failed: {ort['err']}")
        checks = json.loads(ort["out"].strip().splitlines()[-1])
        for row, out in zip(rows, outputs):
            row["ort_runs"] = checks[str(out)]["finite"]
            row["sqnr_db_vs_fp32"] = round(checks[str(out)]["sqnr_db"], 1)
        payload = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), ONNX Runtime "
                       f"{__import__('onnxruntime').__version__} CPU",
            "model": {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn,
                      "disk_gb": round(size / 1e9, 3), "fp32_weights_gb": round(weights / 1e9, 3)},
            "bar": "peak RSS of the compile process ≤ 1.5 × the model's size on disk",
            "rows": rows,
            "ort_peak_rss_gb_all_three_models": round(ort["peak_rss_bytes"] / 1e9, 3),
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "large_model.json").write_text(json.dumps(payload, indent=2) + "\n")
        lines = [f"Synthetic decoder: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}: "
                 f"{size / 1e9:.2f} GB on disk (external data). {payload['machine']}.", "",
                 "| recipe | compile s | peak RSS GB | RSS / model size | output GB | external data | ORT runs | SQNR dB |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['recipe']} | {r['compile_seconds']} | {r['peak_rss_gb']} | "
                         f"{r['rss_over_model_size']} | {r['output_gb']} | {r['output_external_data']} | "
                         f"{r['ort_runs']} | {r['sqnr_db_vs_fp32']} |")
        (RESULTS / "large_model.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
