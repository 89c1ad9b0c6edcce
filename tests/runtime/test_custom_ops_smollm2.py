"""SmolLM2 through qcompile's custom ops (slow: QCOMPILE_SLOW=1).

The same 4-bit weights through Int4MatMul (--target ort-cuda, CPU kernels here) and through
standard DequantizeLinear (--target qdq) give the same perplexity to fp16 rounding (the custom
op's parameters are fp16); LLM.int8() through MixedInt8MatMul and through its graph form
likewise, and close to fp32. Measured (16 windows × 512, 2-core x86, ORT 1.31.1 CPU): W4A16 RTN
g128 29.540 both ways (×1.2915 of fp32 22.872); --int8-mixed graph form 22.935 (×1.0027).
"""

import json

import onnx
import pytest

models = pytest.importorskip("models")

from qcompiler.cli import main  # noqa: E402


def _compile(*args) -> None:
    assert main([*map(str, args), "--quiet"]) == 0


def _perplexity(float_path, quant_path, tmp_path, windows: int = 4) -> dict:
    out = tmp_path / f"{quant_path.stem}.json"
    assert main(["eval", str(float_path), str(quant_path), "--task", "lm", "--limit", str(windows),
                 "--runs", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())["metrics"]


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}


@pytest.mark.slow
def test_int4matmul_perplexity_equals_the_standard_graph(tmp_path):
    float_path = models.export("smollm2").onnx_path
    custom, standard = tmp_path / "int4.onnx", tmp_path / "qdq.onnx"
    common = ["--w4a16", "--method", "rtn", "--no-keep-grid"]
    _compile(float_path, *common, "--target", "ort-cuda", "-o", custom)
    _compile(float_path, *common, "--target", "qdq", "-o", standard)
    assert "Int4MatMul" in _ops(custom) and "Int4MatMul" not in _ops(standard)
    a, b = _perplexity(float_path, custom, tmp_path), _perplexity(float_path, standard, tmp_path)
    assert a["perplexity quant"] == pytest.approx(b["perplexity quant"], rel=1e-3)
    assert 1.1 < a["perplexity ratio"] < 1.5  # RTN g128 4-bit: ×1.29 on 16 windows


@pytest.mark.slow
def test_llm_int8_custom_op_equals_its_graph_form(tmp_path):
    float_path = models.export("smollm2").onnx_path
    calib = tmp_path / "calib"
    assert main(["models", "data", "smollm2", "--split", "calib", "-o", str(calib), "-n", "4"]) == 0
    custom, graph = tmp_path / "mixed_op.onnx", tmp_path / "mixed_graph.onnx"
    _compile(float_path, "--int8-mixed", "--calib-data", calib, "--target", "ort-cuda", "-o", custom)
    _compile(float_path, "--int8-mixed", "--calib-data", calib, "-o", graph)
    assert "MixedInt8MatMul" in _ops(custom) and "MatMulIntegerToFloat" in _ops(graph)
    a, b = _perplexity(float_path, custom, tmp_path), _perplexity(float_path, graph, tmp_path)
    assert a["perplexity quant"] == pytest.approx(b["perplexity quant"], rel=1e-3)
    assert a["perplexity ratio"] < 1.01
