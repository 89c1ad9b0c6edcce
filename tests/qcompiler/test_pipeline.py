import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompiler.config import CalibrationConfig, W8A8Config
from qcompiler.errors import QCompileError
from qcompiler.pipeline import compile_model, plan
from tests import graphs


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(), path)
    return path


def _feeds(n=6, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(1, 4, 32)).astype(np.float32) for _ in range(n)]
    return lambda: ({"x": x} for x in xs)


@pytest.mark.parametrize("activations", ["static", "dynamic", "per-token"])
def test_compile_writes_a_valid_model_and_leaves_the_input_alone(mlp_path, tmp_path, activations):
    before = _digest(mlp_path)
    out = tmp_path / "mlp.q.onnx"
    config = W8A8Config(activations=activations, calibration=CalibrationConfig(method="minmax"))
    result = compile_model(mlp_path, out, config, _feeds(), progress=False)
    assert _digest(mlp_path) == before
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["y"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["qcompile.recipe"] == "w8a8" and activations in meta["qcompile.flags"]
    x = np.random.default_rng(9).normal(size=(2, 4, 32)).astype(np.float32)
    ref = ort.InferenceSession(mlp_path).run(None, {"x": x})[0]
    got = ort.InferenceSession(out).run(None, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03
    assert result.output_bytes < result.input_bytes
    assert not list(tmp_path.glob(".qcompile-*"))  # no staging folder left behind


def test_compiling_a_compiled_model_changes_nothing(mlp_path, tmp_path):
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    compile_model(mlp_path, once, W8A8Config(), progress=False)
    result = compile_model(once, twice, W8A8Config(), progress=False)
    assert not any(r.added or r.removed for r in result.reports)


def test_plan_reports_passes_and_writes_nothing(mlp_path, tmp_path):
    reports = plan(mlp_path, W8A8Config(activations="static"))
    names = [r.name for r in reports]
    assert names[0] == "CanonicalizePass" and names[-1] == "CleanupPass"
    by_name = {r.name: r for r in reports}
    assert by_name["SelectTargetsPass"].note == "selected 2 MatMul"
    assert by_name["InsertStaticQDQPass"].added == {"QuantizeLinear": 2, "DequantizeLinear": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_static_without_data_and_output_equal_to_input_are_refused(mlp_path):
    with pytest.raises(QCompileError, match="calibration data"):
        compile_model(mlp_path, mlp_path.with_name("o.onnx"), W8A8Config(activations="static"), None)
    with pytest.raises(QCompileError, match="input model"):
        compile_model(mlp_path, mlp_path, W8A8Config(), None)


@pytest.mark.parametrize(
    "target, placement, lowered",
    [("ort-cpu", "fusable", True), ("qdq", "all", False), ("ort-cuda", "weighted", False)],
)
def test_targets_choose_placement_and_lowering(mlp_path, tmp_path, target, placement, lowered):
    config = W8A8Config(activations="static", target=target)
    assert config.placement == placement
    out = tmp_path / f"{target}.onnx"
    compile_model(mlp_path, out, config, _feeds(), progress=False)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert ("MatMulIntegerToFloat" in ops) == lowered and ("DequantizeLinear" in ops) != lowered


def test_verify_compares_against_the_qdq_stage(mlp_path, tmp_path):
    result = compile_model(mlp_path, tmp_path / "v.onnx", W8A8Config(activations="static"),
                           _feeds(), progress=False, verify_samples=3)
    assert result.verification.ok
    assert [(c.op_type, c.count) for c in result.verification.ops] == [("MatMulIntegerToFloat", 2)]


def test_float_residuals_needs_static_activations():
    with pytest.raises(QCompileError, match="static"):
        W8A8Config(activations="per-token", float_residuals=True)


def test_plan_absorbs_relu_like_a_real_compile(tmp_path):
    from tests.qcompiler.test_verify import conv_chain

    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), path)
    by_name = {r.name: r for r in plan(path, W8A8Config(activations="static"))}
    assert by_name["FuseIntegerOpsPass"].added == {"QLinearConv": 1}
    assert by_name["FuseIntegerOpsPass"].removed.get("Relu") == 1
