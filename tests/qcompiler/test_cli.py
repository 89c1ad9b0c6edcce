import subprocess
import sys

import numpy as np
import onnx
import pytest

from qcompiler.cli import main
from tests import graphs


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(), path)
    return path


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def test_compile_default_command_writes_output(mlp_path, capsys):
    assert main([str(mlp_path), "--w8a8", "--quiet"]) == 0
    assert mlp_path.with_name("mlp.w8a8.onnx").exists()
    assert "per-token-sym activations" in capsys.readouterr().out


def test_static_with_calibration_file(mlp_path, tmp_path):
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(4, 1, 3, 32)).astype(np.float32))
    out = tmp_path / "s.onnx"
    assert main([str(mlp_path), "--w8a8", "--calib-data", str(tmp_path / "c.npz"), "-o", str(out), "--quiet"]) == 0
    ops = {n.op_type for n in onnx.load(out).graph.node}
    # calibration data → static, lowered for ONNX Runtime's CPU integer kernels
    assert "QuantizeLinear" in ops and "MatMulIntegerToFloat" in ops and "MatMul" not in ops
    assert "DequantizeLinear" not in ops


def test_qdq_target_keeps_standard_qdq(mlp_path, tmp_path):
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(4, 1, 3, 32)).astype(np.float32))
    out = tmp_path / "q.onnx"
    assert main([str(mlp_path), "--w8a8", "--target", "qdq", "--calib-data", str(tmp_path / "c.npz"),
                 "-o", str(out), "--quiet"]) == 0
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain == "" for n in model.graph.node)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops and "MatMulIntegerToFloat" not in ops


def test_verify_prints_checks(mlp_path, tmp_path, capsys):
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(4, 1, 3, 32)).astype(np.float32))
    out = tmp_path / "v.onnx"
    assert main([str(mlp_path), "--w8a8", "--calib-data", str(tmp_path / "c.npz"), "-o", str(out),
                 "--verify", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "verify 2 MatMulIntegerToFloat: max |Δ| vs QDQ" in text and "SQNR vs float" in text


def test_failed_verification_is_exit_1(mlp_path, tmp_path, capsys, monkeypatch):
    from qcompiler import verify

    failing = verify.Verification([verify.OpCheck("QLinearConv", 3, 7.0, 1.0)], [])
    monkeypatch.setattr(verify, "check", lambda *a, **k: failing)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(2, 1, 3, 32)).astype(np.float32))
    args = [str(mlp_path), "--w8a8", "--calib-data", str(tmp_path / "c.npz"), "-o",
            str(tmp_path / "f.onnx"), "--verify", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verification failed" in err[0] and "QLinearConv max |Δ| 7 > 1" in err[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["missing.onnx", "--w8a8"], "not found"),
        (["{model}", "--w8a8", "--activations", "static"], "need calibration data"),
        (["{model}", "--w8a8", "--target", "qdq"], "need calibration data"),
        (["{model}", "--w8a8", "--target", "qdq", "--activations", "per-token"], "calibrated scales"),
        (["{model}", "--w8a8", "--target", "tensorrt"], "tensorrt"),
        (["{model}", "--w8a8", "--verify"], "--verify runs calibration samples"),
        (["{model}", "--w8a8", "-o", "{model}"], "input model"),
        (["{model}", "--w8a8", "-o", "/nonexistent-dir/out.onnx"], "does not exist"),
        (["{model}", "--w8a8", "--calib-text", "t.txt"], "needs --tokenizer"),
        (["{model}", "--w8a8", "--calib-method", "magic"], "magic"),
        (["{model}"], "--w8a8"),
        (["{junk}", "--w8a8"], "cannot read"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(mlp_path, tmp_path, capsys, args, fragment):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage")
    args = [a.format(model=mlp_path, junk=junk) for a in args]
    assert main(args) == 2
    assert fragment in _one_line_error(capsys)


def test_calibration_data_for_another_model_is_exit_2(mlp_path, tmp_path, capsys):
    np.savez(tmp_path / "c.npz", input_ids=np.ones((2, 1, 8), np.int64))
    assert main([str(mlp_path), "--w8a8", "--calib-data", str(tmp_path / "c.npz"), "--quiet"]) == 2
    assert "inputs do not match the model" in _one_line_error(capsys)


def test_console_script_exit_code(mlp_path):
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", "nope.onnx", "--w8a8"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_plan_prints_passes(mlp_path, capsys):
    assert main(["plan", str(mlp_path), "--w8a8"]) == 0
    out = capsys.readouterr().out
    assert "SelectTargetsPass" in out and "+2 com.microsoft.MatMulIntegerToFloat" in out
    assert not mlp_path.with_name("mlp.w8a8.onnx").exists()


def test_ort_cuda_target_says_it_saves_memory_not_time(mlp_path, tmp_path, capsys):
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(4, 1, 3, 32)).astype(np.float32))
    out = tmp_path / "cuda.onnx"
    assert main([str(mlp_path), "--w8a8", "--target", "ort-cuda", "--calib-data", str(tmp_path / "c.npz"),
                 "-o", str(out), "--quiet"]) == 0
    assert "saves memory, not time" in capsys.readouterr().err
    assert all(n.domain == "" for n in onnx.load(out).graph.node)
