"""Decode-shaped kernel benchmark: qcompile's custom ops against ONNX Runtime's own, same run.

Each variant is a model of ``--layers`` linear layers with distinct weights, all reading the
same input ``x: [M, K]`` (``y_i = x W_i``, so the weights stream from memory as in a decoder).
Reported per layer: µs (median of the timed runs ÷ layers), the bytes a layer must move
(weights, scales, activations in and out) per second, and that as a fraction of the copy
bandwidth measured in the same run (``Mul(x, 1)`` on a 512 MB tensor: read + write).

    provider cpu  (default here): float32 MatMul (MLAS), MatMulNBits 4-bit g128 (accuracy level 0),
                  qcompile Int4MatMul (g128), qcompile MixedInt8MatMul (1% outlier channels);
                  float32 activations. M = 2048 only with --full (minutes per row on 2 cores).
    provider cuda (GPU machine, ``make runtime-cuda``): fp16 activations, float16 MatMul
                  (cuBLAS), MatMulNBits, Int4MatMul, MixedInt8MatMul; CUDA graphs on, inputs
                  and outputs bound on the device.

    python bench/kernels.py [--provider cpu|cuda] [--m 1 4 16] [--layers 4] [--full]

Writes ``bench/results/kernels_<provider>.json`` (and prints the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from passes.emit_custom_ops import int4_inputs  # noqa: E402
from passes.emit_matmulnbits import matmulnbits_inputs  # noqa: E402
from passes.llm_int8 import quantize_weight  # noqa: E402
from qcompiler.packed_weight import PackedWeight  # noqa: E402
from qcompiler.quant_math import WeightFormat  # noqa: E402
from runtime import custom_ops  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008)]
M_VALUES = [1, 4, 16, 64, 256, 2048]
GROUP = 128
OUTLIER_FRACTION = 0.01
VARIANTS = ("matmul", "matmulnbits", "int4matmul", "mixedint8matmul")


def _model(nodes, k: int, layers: int, dtype: int, inits: list) -> bytes:
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", dtype, ["M", k])],
                              [helper.make_tensor_value_info(f"y{i}", dtype, None) for i in range(layers)], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
              helper.make_opsetid(custom_ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def build(variant: str, k: int, n: int, layers: int, half: bool, seed: int = 0) -> tuple[bytes, int]:
    """``(model, bytes one layer reads as weights)``."""
    rng = np.random.default_rng(seed)
    dtype = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    fdt = np.float16 if half else np.float32
    nodes, inits, weight_bytes = [], [], 0
    for i in range(layers):
        w = rng.normal(0, 0.02, (k, n)).astype(np.float32)
        if variant == "matmul":
            arrays = {f"w{i}": w.astype(fdt)}
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        elif variant in ("matmulnbits", "int4matmul"):
            packed = PackedWeight.from_quantized(WeightFormat(4, GROUP, False).quantize(w), 4, "rtn")
            if variant == "matmulnbits":
                bs, b, s, z = matmulnbits_inputs(packed)
                arrays = {f"b{i}": b, f"s{i}": s.astype(fdt), f"z{i}": z}
                nodes.append(helper.make_node("MatMulNBits", ["x", *arrays], [f"y{i}"], domain="com.microsoft",
                                              K=k, N=n, bits=4, block_size=bs, accuracy_level=0))
            else:
                g, b, s, z = int4_inputs(packed)
                arrays = {f"b{i}": b, f"s{i}": s, f"z{i}": z}
                nodes.append(helper.make_node("Int4MatMul", ["x", *arrays], [f"y{i}"], domain=custom_ops.DOMAIN,
                                              K=k, N=n, group_size=g))
        else:
            outliers = np.sort(rng.choice(k, int(OUTLIER_FRACTION * k), replace=False)).astype(np.int64)
            q, scale, w16 = quantize_weight(w, outliers)
            arrays = {f"q{i}": np.ascontiguousarray(q.T), f"s{i}": scale, f"o{i}": outliers, f"w{i}": w16}
            nodes.append(helper.make_node("MixedInt8MatMul", ["x", *arrays], [f"y{i}"], domain=custom_ops.DOMAIN))
        inits += [numpy_helper.from_array(a, name) for name, a in arrays.items()]
        weight_bytes = sum(a.nbytes for a in arrays.values())
    return _model(nodes, k, layers, dtype, inits), weight_bytes


def session(model: bytes, provider: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if custom_ops.imports_domain(model):
        custom_ops.register(options, cuda=provider == "cuda")
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(model, options, providers=providers)


def timed(sess: ort.InferenceSession, x: np.ndarray, provider: str, min_seconds: float, min_runs: int) -> float:
    """Median seconds of one run (CUDA: device-bound input/outputs, replayed CUDA graph)."""
    if provider == "cuda":
        binding = sess.io_binding()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding.bind_ortvalue_input("x", x_dev)
        for out in sess.get_outputs():
            binding.bind_output(out.name, "cuda", 0)
        sess.run_with_iobinding(binding)  # captures the graph
        # outputs must stay at fixed addresses for graph replay: bind the allocated ones
        for out, value in zip(sess.get_outputs(), binding.get_outputs()):
            binding.bind_ortvalue_output(out.name, value)

        def once():
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
    else:
        def once():
            sess.run(None, {"x": x})
    once()
    once()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
        if len(times) >= 200:
            break
    return statistics.median(times)


def copy_bandwidth(provider: str, threads: int, half: bool) -> float:
    """GB/s of ``Mul(x, 1)`` over 512 MB (read + write), as a kernel would see it."""
    elements = (512 << 20) // 4
    dtype = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    one = numpy_helper.from_array(np.ones(1, np.float16 if half else np.float32), "one")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "one"], ["y0"])], "copy",
                              [helper.make_tensor_value_info("x", dtype, ["M", 1024])],
                              [helper.make_tensor_value_info("y0", dtype, None)], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()
    x = np.ones((elements // 1024, 1024), np.float16 if half else np.float32)
    seconds = timed(session(model, provider, threads), x, provider, 1.0, 3)
    return 2 * x.nbytes / seconds / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--m", type=int, nargs="+")
    parser.add_argument("--layers", type=int, help="layers per model (default: 2 on CPU, 8 on CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="CPU: also M = 2048")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per row")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    provider, half = args.provider, args.provider == "cuda"
    m_values = args.m or [m for m in M_VALUES if provider == "cuda" or args.full or m < 2048]
    layers = args.layers or (8 if provider == "cuda" else 2)
    custom_ops.require_library(cuda=provider == "cuda")
    bandwidth = copy_bandwidth(provider, args.threads, half)
    label = (f"ONNX Runtime {ort.__version__}, {provider.upper()} provider"
             + (f", {args.threads} threads, {os.cpu_count()}-core {platform.machine()}" if provider == "cpu" else
                ", CUDA graph on"))
    print(f"{label}; copy bandwidth {bandwidth:.1f} GB/s; {'fp16' if half else 'fp32'} activations; "
          f"{layers} layers per model")
    header = f"{'K×N':>11} {'M':>5} {'variant':>16} {'µs/layer':>10} {'GB/s':>8} {'of copy':>8}"
    print(header)
    rows = []
    for k, n in SHAPES:
        for variant in args.variants:
            model, weight_bytes = build(variant, k, n, layers, half)
            sess = session(model, provider, args.threads)
            for m in m_values:
                x = np.random.default_rng(m).normal(size=(m, k)).astype(np.float16 if half else np.float32)
                seconds = timed(sess, x, provider, args.seconds, 3) / layers
                moved = weight_bytes + x.nbytes + m * n * x.itemsize
                row = dict(K=k, N=n, M=m, variant=variant, us_per_layer=seconds * 1e6,
                           gb_per_s=moved / seconds / 1e9, fraction_of_copy=moved / seconds / 1e9 / bandwidth,
                           weight_bytes=weight_bytes)
                rows.append(row)
                print(f"{f'{k}×{n}':>11} {m:>5} {variant:>16} {row['us_per_layer']:>10.1f} "
                      f"{row['gb_per_s']:>8.2f} {row['fraction_of_copy']:>8.3f}", flush=True)
            del sess
    out = ROOT / "bench" / "results" / f"kernels_{provider}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": label, "copy_gb_per_s": bandwidth, "layers": layers,
                               "activations": "fp16" if half else "fp32", "rows": rows}, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
