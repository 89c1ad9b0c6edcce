"""cuBLASLt FP8 GEMM vs fp16 on SmolLM2-135M's linear layers (needs a CUDA GPU; torch only).

The kernel-level half of the ort-cuda story: ``com.microsoft.GemmFloat8`` calls cuBLASLt's FP8
matmul, as ``torch._scaled_mm`` does. For each linear layer shape of SmolLM2 (``x: [M, K]``,
``W: [K, N]``) this times, GPU time per call (100 calls in a CUDA graph, median of 15 replays):

* fp16 ``x @ W``;
* E4M3 ``_scaled_mm(x_q, W_q^T stored [N, K] and viewed transposed)`` (the TN layout
  qcompile emits: ``transB = 1``, weight stored transposed), per-tensor scales, fp16 output;
* the same with the weight stored ``[K, N]`` row-major (NN), which cuBLASLt refuses.

M = 1 (a decode step), 512 (prefill of 1×512) and 8192 (16×512); ``quantize_us`` is the
activation's QuantizeLinear (``x/s → E4M3``), a separate kernel in the ONNX graph. Writes JSON to the path given (default
``bench/results/fp8_gemm_cuda.json``). Timing of the ONNX Runtime graphs themselves needs
onnxruntime-gpu (not installable on the lent machine): still owed.

    python bench/fp8_gemm_cuda.py [OUT.json]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads × 64, 3 KV heads × 64, vocab 49152.
SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192), "gate/up_proj": (576, 1536),
          "down_proj": (1536, 576), "lm_head": (576, 49152)}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}  # × 30 layers


def _time(fn, runs: int = 15, inner: int = 100, warmup: int = 10) -> float:
    """GPU µs per call: ``inner`` calls captured in one CUDA graph, replayed ``runs`` times
    between CUDA events (median), so neither Python nor launch overhead is what is measured."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "fp8_gemm_cuda.json"
    if not torch.cuda.is_available():
        print("no CUDA device: the fp8 GEMM timings are owed")
        return
    dev = torch.device("cuda")
    e4m3 = torch.float8_e4m3fn
    rows = []
    for m in (1, 512, 8192):
        for name, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            w = torch.randn(k, n, device=dev, dtype=torch.float16) * 0.05
            sx = (x.abs().max().float() / 448).reshape(())
            sw = (w.abs().max().float() / 448).reshape(())
            xq = (x.float() / sx).to(e4m3)
            w_t = (w.float() / sw).to(e4m3).t().contiguous()  # stored [N, K]
            fp16_us = _time(lambda: x @ w)
            quantize_us = _time(lambda: (x.float() / sx).to(e4m3))
            fp8_us = _time(lambda: torch._scaled_mm(xq, w_t.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float16))
            ref = (xq.float() * sx) @ (w_t.t().float() * sw)
            got = torch._scaled_mm(xq, w_t.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32)
            rel = float((got - ref).abs().max() / ref.abs().max())
            try:
                w_nn = (w.float() / sw).to(e4m3).contiguous()  # stored [K, N] row-major: NN
                torch._scaled_mm(xq, w_nn, scale_a=sx, scale_b=sw, out_dtype=torch.float16)
                nn = "ran"
            except RuntimeError as exc:
                nn = "refused: " + str(exc).splitlines()[0][:120]
            rows.append({"M": m, "layer": name, "K": k, "N": n, "fp16_us": fp16_us, "fp8_tn_us": fp8_us, "quantize_us": quantize_us,
                         "speedup": fp16_us / fp8_us, "fp8_vs_reference_rel_err": rel, "nn_layout": nn})
            print(f"M={m:4d} {name:14s} K={k:5d} N={n:5d}  fp16 {fp16_us:8.1f} µs  fp8 TN {fp8_us:8.1f} µs  "
                  f"×{fp16_us / fp8_us:.2f}  NN: {nn[:40]}", flush=True)
    totals = {}
    for m in (1, 512, 8192):
        sel = {r["layer"]: r for r in rows if r["M"] == m}
        for key in ("fp16_us", "fp8_tn_us", "quantize_us"):
            totals[f"M={m} {key} (30 layers + lm_head)"] = (
                30 * sum(sel[l][key] * c for l, c in PER_LAYER.items()) + sel["lm_head"][key])
    payload = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "totals": totals}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(totals, indent=2))


if __name__ == "__main__":
    main()
