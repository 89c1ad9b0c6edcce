"""The weight-only recipes (--w4a16, --w8a16) from the command line and the pipeline: which passes
run, what the output holds (MatMulNBits or standard blocked DequantizeLinear), that it runs in
ONNX Runtime close to the float model, and that bad combinations are one line and exit code 2."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from passes.emit_custom_ops import EmitInt4MatMulPass
from onnx import TensorProto, helper

from passes.emit_dequantize_linear import EmitDequantizeLinearPass
from passes.emit_matmulnbits import EmitMatMulNBitsPass
from passes.keep_grid import KeepGridPass
from passes.quantize_weight_only import QuantizeWeightOnlyPass
from qcompiler import quant_math as qm
from qcompiler.cli import main
from qcompiler.config import W8A8Config, WeightOnlyConfig
from qcompiler.errors import QCompileError
from qcompiler.pipeline import lowering_passes, quantization_passes, weight_only_passes
from tests import graphs

K, HIDDEN = 64, 128


@pytest.fixture
def mlp_path(tmp_path):
    """graphs.mlp: x[B, S, 64] → fc1 [64, 128] → Relu → fc2 (Transpose of a [64, 128] table)
    → + x. No MatMul produces a graph output (no LM head)."""
    path = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(k=K, n=HIDDEN), path)
    return path


@pytest.fixture
def calib_path(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(6, 1, 16, K)).astype(np.float32))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _outputs(float_path, quant_path, seed: int = 9):
    x = np.random.default_rng(seed).normal(size=(2, 8, K)).astype(np.float32)
    return _session(float_path).run(None, {"x": x})[0], _session(quant_path).run(None, {"x": x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _weights(path) -> dict[str, np.ndarray]:
    """fc1's and fc2's float weights as the MatMuls see them ([K, N])."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    return {"fc1": inits["w1"], "fc2": inits["w2t"].T}


# --- compile ---------------------------------------------------------------------------------------


def test_w4a16_without_calibration_is_rtn_and_says_so(mlp_path, tmp_path, capsys):
    before = _digest(mlp_path)
    out = tmp_path / "mlp.w4.onnx"
    assert main([str(mlp_path), "--w4a16", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "4-bit weights" in captured.out and "groups of 128" in captured.out
    report = next(line for line in captured.err.splitlines() if "QuantizeWeightOnlyPass" in line)
    assert report.rstrip().endswith("2 rtn")  # the note: no calibration data, round to nearest
    assert _digest(mlp_path) == before  # the input model is only read
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(n.domain == "com.microsoft" for n in nbits)
    assert "MatMul" not in {n.op_type for n in model.graph.node}
    # The stored scales are round to nearest's (asymmetric, groups of min(128, K) rows).
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node, (name, w) in zip(nbits, _weights(mlp_path).items()):
        attrs = _attrs(node)
        assert (attrs["bits"], attrs["K"], attrs["N"]) == (4, *w.shape)
        expected = qm.WeightFormat(4, 128).quantize(w)
        block = attrs["block_size"]
        scales = inits[node.input[2]]  # [N, K / block], each group's scale repeated per block
        np.testing.assert_array_equal(scales, np.repeat(expected.scale, min(128, w.shape[0]) // block, axis=0).T)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qcompile.recipe"] == "w4a16"
    flags = json.loads(meta["qcompile.flags"])
    assert (flags["bits"], flags["group_size"], flags["keep_grid"]) == (4, 128, True)
    float_y, quant_y = _outputs(mlp_path, out)
    assert _cosine(float_y, quant_y) >= 0.99


def test_w8a16_runs_close_to_float(mlp_path, tmp_path):
    out = tmp_path / "mlp.w8.onnx"
    assert main([str(mlp_path), "--w8a16", "-o", str(out), "--quiet"]) == 0
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert [_attrs(n)["bits"] for n in nbits] == [8, 8]
    assert json.loads({p.key: p.value for p in model.metadata_props}["qcompile.flags"])["group_size"] is None
    float_y, quant_y = _outputs(mlp_path, out)
    assert _cosine(float_y, quant_y) >= 0.999
    assert np.abs(quant_y - float_y).max() <= 0.02 * np.abs(float_y).max()


def test_qdq_target_is_standard_onnx_with_blocked_dequantize_linear(mlp_path, tmp_path):
    out = tmp_path / "mlp.qdq.onnx"
    assert main([str(mlp_path), "--w4a16", "--group-size", "32", "--target", "qdq", "-o", str(out), "--quiet"]) == 0
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} == {""}  # no com.microsoft ops
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 21
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(_attrs(n) == {"axis": 0, "block_size": 32} for n in dq)
    inits = {t.name: t for t in model.graph.initializer}
    assert {inits[n.input[0]].data_type for n in dq} == {TensorProto.UINT4}
    float_y, quant_y = _outputs(mlp_path, out)
    assert _cosine(float_y, quant_y) >= 0.99


def test_default_target_and_qdq_target_compute_the_same_numbers(mlp_path, tmp_path):
    outs = {}
    for target in ("ort-cpu", "qdq"):
        outs[target] = tmp_path / f"{target}.onnx"
        assert main([str(mlp_path), "--w4a16", "--group-size", "32", "--target", target, "-o",
                     str(outs[target]), "--quiet"]) == 0
    assert "MatMulNBits" in {n.op_type for n in onnx.load(outs["ort-cpu"]).graph.node}
    _, nbits = _outputs(mlp_path, outs["ort-cpu"])
    _, qdq = _outputs(mlp_path, outs["qdq"])
    np.testing.assert_allclose(nbits, qdq, rtol=1e-5, atol=1e-5 * np.abs(qdq).max())


@pytest.mark.parametrize("method", ["gptq", "awq", "auto"])
def test_calibrated_methods(mlp_path, calib_path, tmp_path, capsys, method):
    if method in ("gptq", "auto"):
        pytest.importorskip("torch")
    out = tmp_path / f"mlp.{method}.onnx"
    args = [str(mlp_path), "--w4a16", "--group-size", "32", "--calib-data", str(calib_path), "-o", str(out)]
    if method != "auto":
        args += ["--method", method]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    report = next(line for line in err if "QuantizeWeightOnlyPass" in line)
    if method == "auto":  # auto + data: GPTQ and AWQ compiled, the one chosen reported
        method = next(line for line in err if "WeightOnlyAutoChoice" in line).split("auto chose ")[1].split(":")[0].split()[0]
    assert report.rstrip().endswith("2 awq" if method == "awq" else "2 gptq")
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert "qcompile.calibration_digest" in meta
    float_y, quant_y = _outputs(mlp_path, out)
    assert _cosine(float_y, quant_y) >= 0.99


def test_kmeans_runs_through_the_dequantize_linear_fallback(mlp_path, tmp_path, capsys):
    out = tmp_path / "mlp.kmeans.onnx"
    assert main([str(mlp_path), "--w4a16", "--method", "kmeans", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 DequantizeLinear fallbacks (codebook: MatMulNBits has no table lookup: 2)" in err
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("Gather") == 2 and "MatMulNBits" not in ops
    float_y, quant_y = _outputs(mlp_path, out)
    assert _cosine(float_y, quant_y) >= 0.99


def lm(vocab: int = 96, d: int = K, seed: int = 0) -> onnx.ModelProto:
    """input_ids → Gather(E) → fc → Relu → head → logits (the head's output is a graph output)."""
    rng = np.random.default_rng(seed)
    return graphs.make_model(
        [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
         helper.make_node("MatMul", ["h", "w"], ["f"], name="fc"),
         helper.make_node("Relu", ["f"], ["a"], name="relu"),
         helper.make_node("MatMul", ["a", "head"], ["logits"], name="lm_head")],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", vocab])],
        {"E": rng.normal(size=(vocab, d)).astype(np.float32), "w": rng.normal(0, 0.1, (d, d)).astype(np.float32),
         "head": rng.normal(0, 0.1, (d, vocab)).astype(np.float32)},
    )


@pytest.mark.parametrize("flag, head_bits", [([], 8), (["--lm-head-bits", "same"], 4), (["--lm-head-bits", "2"], 2)])
def test_lm_head_bits(tmp_path, flag, head_bits):
    path = tmp_path / "lm.onnx"
    onnx.save(lm(), path)
    out = tmp_path / "lm.w4.onnx"
    assert main([str(path), "--w4a16", "--group-size", "32", *flag, "-o", str(out), "--quiet"]) == 0
    bits = {_attrs(n)["N"]: _attrs(n)["bits"] for n in onnx.load(out).graph.node if n.op_type == "MatMulNBits"}
    assert bits == {K: 4, 96: head_bits}  # fc: N = 64; lm_head: N = vocab = 96


def test_excluded_node_stays_float(mlp_path, tmp_path):
    out = tmp_path / "mlp.ex.onnx"
    assert main([str(mlp_path), "--w4a16", "--exclude", "fc1", "-o", str(out), "--quiet"]) == 0
    nodes = {n.op_type: n for n in onnx.load(out).graph.node}
    assert nodes["MatMul"].name == "fc1" and _attrs(nodes["MatMulNBits"])["K"] == HIDDEN


def test_act_order_without_calibration_data_is_refused(mlp_path, tmp_path, capsys):
    assert main([str(mlp_path), "--w4a16", "--act-order", "-o", str(tmp_path / "ao.onnx")]) == 2
    assert "--act-order" in _one_line_error(capsys)


# --- plan ------------------------------------------------------------------------------------------


def test_plan_prints_the_weight_only_passes_and_writes_nothing(mlp_path, tmp_path, capsys):
    before = _digest(mlp_path)
    assert main(["plan", str(mlp_path), "--w4a16"]) == 0
    out = capsys.readouterr().out
    lines = [line.split()[0] for line in out.splitlines()[1:]]
    assert lines == ["CanonicalizePass", "SelectTargetsPass", "KeepGridPass", "QuantizeWeightOnlyPass",
                     "QuantizeEmbeddingsPass", "EmitMatMulNBitsPass", "CleanupPass"]
    assert "w4a16, 4-bit weights" in out and "+2 com.microsoft.MatMulNBits" in out and "2 rtn" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
    assert _digest(mlp_path) == before


def test_plan_with_qdq_target_and_calibrated_method(mlp_path, calib_path, tmp_path, capsys):
    assert main(["plan", str(mlp_path), "--w4a16", "--method", "awq", "--calib-data", str(calib_path),
                 "--target", "qdq", "--no-keep-grid"]) == 0
    out = capsys.readouterr().out
    assert "EmitDequantizeLinearPass" in out and "KeepGridPass" not in out and "+2 DequantizeLinear" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "mlp.onnx"]


# --- bad input: one line, exit code 2 ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["{model}", "--w4a16", "--method", "gptq"], "--calib-data"),
        (["{model}", "--w4a16", "--method", "awq"], "--calib-data"),
        (["{model}", "--w4a16", "--activations", "static"], "applies to --w8a8"),
        (["{model}", "--w8a16", "--smoothquant"], "applies to --w8a8"),
        (["{model}", "--w4a16", "--act-order", "--method", "rtn"], "--act-order applies to --method gptq"),
        (["{model}", "--w4a16", "--bits", "5"], "'5'"),
        (["{model}", "--w4a16", "--method", "magic"], "magic"),
        (["{model}", "--w4a16", "--group-size", "0"], "--method kmeans"),
        (["{model}", "--w4a16", "--group-size", "-4"], "-4"),
        (["{model}", "--w8a8", "--bits", "4"], "applies to --w4a16/--w8a16"),
        (["{model}", "--w8a8", "--method", "gptq"], "applies to --w4a16/--w8a16"),
        (["{model}", "--bits", "4"], "choose a recipe"),
        (["{model}"], "choose a recipe"),
        (["plan", "{model}", "--w4a16", "--bits", "5"], "'5'"),
        (["plan", "{model}", "--method", "rtn"], "choose a recipe"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(mlp_path, tmp_path, capsys, args, fragment):
    before = _digest(mlp_path)
    args = [a.format(model=mlp_path) for a in args]
    assert main(args) == 2
    assert fragment in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]  # nothing written
    assert _digest(mlp_path) == before


# --- the pipeline ----------------------------------------------------------------------------------


def _names(passes) -> list[str]:
    return [type(p).__name__ for p in passes]


def _feeds():
    return iter([{"x": np.zeros((1, 4, K), np.float32)}])


def test_weight_only_pass_lists():
    assert _names(weight_only_passes(WeightOnlyConfig(), None)) == [
        "CanonicalizePass", "SelectTargetsPass", "KeepGridPass", "QuantizeWeightOnlyPass",
        "QuantizeEmbeddingsPass", "EmitMatMulNBitsPass", "CleanupPass"]
    passes = weight_only_passes(WeightOnlyConfig(method="awq", target="qdq", keep_grid=False,
                                                 quantize_embeddings=False), _feeds)
    assert _names(passes) == ["CanonicalizePass", "SelectTargetsPass", "AWQPass", "QuantizeWeightOnlyPass",
                              "EmitDequantizeLinearPass", "CleanupPass"]
    # the grid is recognised before AWQ may rescale anything
    names = _names(weight_only_passes(WeightOnlyConfig(method="awq"), _feeds))
    assert names.index("KeepGridPass") < names.index("AWQPass") < names.index("QuantizeWeightOnlyPass")
    assert isinstance(weight_only_passes(WeightOnlyConfig(target="ort-cuda"), None)[-2], EmitInt4MatMulPass)
    assert isinstance(weight_only_passes(WeightOnlyConfig(target="qdq"), None)[-2], EmitDequantizeLinearPass)


@pytest.mark.parametrize("method, feeds, resolved", [
    ("auto", None, "rtn"), ("auto", _feeds, "gptq"), ("rtn", _feeds, "rtn"), ("kmeans", None, "kmeans"),
])
def test_auto_resolves_by_calibration_data(method, feeds, resolved):
    config = WeightOnlyConfig(method=method, group_size=None)
    quantize = next(p for p in weight_only_passes(config, feeds) if isinstance(p, QuantizeWeightOnlyPass))
    assert quantize.method == resolved


def test_gptq_without_feeds_is_refused_by_the_pipeline():
    with pytest.raises(QCompileError, match="--calib-data"):
        weight_only_passes(WeightOnlyConfig(method="gptq"), None)


def test_keep_grid_pass_gets_the_recipe_bits_and_weight_only_has_no_lowering():
    keep = next(p for p in weight_only_passes(WeightOnlyConfig(bits=4), None) if isinstance(p, KeepGridPass))
    assert keep.bits == 8  # grids up to 8 bits are kept whatever the recipe's width (documented)
    assert lowering_passes(WeightOnlyConfig()) == []
    assert _names(quantization_passes(WeightOnlyConfig(), None)) == _names(weight_only_passes(WeightOnlyConfig(), None))
    assert "AWQPass" not in _names(quantization_passes(W8A8Config(), None))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(bits=5), "--bits"), (dict(bits=4, group_size=0), "kmeans"), (dict(act_order=True, method="awq"), "gptq"),
    (dict(method="nope"), "nope"), (dict(target="tensorrt"), "tensorrt"), (dict(damp=0.0), "dampening"),
    (dict(lm_head_bits=5), "--lm-head-bits"),
])
def test_config_validation(kwargs, fragment):
    with pytest.raises(QCompileError, match=fragment):
        WeightOnlyConfig(**kwargs)


def test_config_names_and_calibration_needs():
    assert WeightOnlyConfig(bits=4).name == "w4a16" and WeightOnlyConfig(bits=8).name == "w8a16"
    assert WeightOnlyConfig(method="gptq").needs_calibration and WeightOnlyConfig(method="awq").needs_calibration
    assert not WeightOnlyConfig(method="auto").needs_calibration
    assert WeightOnlyConfig(bits=3, group_size=0, method="kmeans").describe() == (
        "3-bit weights (kmeans, one codebook per tensor), float activations")


# --- the reference model ------------------------------------------------------------------------

try:
    import models

    SMOLLM2 = models.DEFAULT_CACHE / "smollm2" / "model.onnx"
except ImportError:
    SMOLLM2 = None


@pytest.mark.skipif(SMOLLM2 is None or not SMOLLM2.is_file(), reason="no cached SmolLM2 export")
def test_smollm2_w4a16_plan_keeps_every_grid(capsys):
    """SmolLM2's weights come from GGUF Q4_1 (210 MatMuls, blocks of 32) with a Q8_0 tied head:
    the default --w4a16 keeps them all and re-rounds nothing."""
    assert main(["plan", str(SMOLLM2), "--w4a16"]) == 0
    out = capsys.readouterr().out
    keep = next(line for line in out.splitlines() if "KeepGridPass" in line)
    assert "211 weights kept on their grid (210× 4-bit, blocks of 32, 1× 8-bit, blocks of 32)" in keep
    quantize = next(line for line in out.splitlines() if "QuantizeWeightOnlyPass" in line)
    assert quantize.rstrip().endswith("211 grid")
