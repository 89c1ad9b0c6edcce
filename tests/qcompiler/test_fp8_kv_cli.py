"""The ``--fp8`` and ``--kv-cache`` command-line paths on tiny graphs."""

import numpy as np
import onnx
import pytest

from qcompiler.cli import main
from tests import graphs
from tests.passes.test_quantize_kv_cache import _decoder


def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile: error:"), err
    return err[0]


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(), path)
    return path


def test_fp8_compiles_to_float8_qdq_with_calibrated_scales(mlp_path, tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(4, 1, 3, 32)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    out = tmp_path / "m.fp8.onnx"
    assert main([str(mlp_path), "--fp8", "--calib-data", str(tmp_path / "c.npz"), "--calib-method", "minmax",
                 "-o", str(out), "--quiet"]) == 0
    model = onnx.load(out)
    assert model.opset_import[0].version >= 19
    inits = {i.name: i for i in model.graph.initializer}
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert inits[first_q.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN
    scale = onnx.numpy_helper.to_array(inits[first_q.input[1]])
    assert scale == pytest.approx(np.abs(x).max() / 448, rel=1e-6)  # the first MatMul reads x itself
    assert "fp8 e4m3 per-channel weights" in capsys.readouterr().out


def test_fp8_needs_calibration_and_refuses_other_recipes_options(mlp_path, capsys):
    assert main([str(mlp_path), "--fp8"]) == 2
    assert "--calib-data" in _error(capsys)
    assert main([str(mlp_path), "--fp8", "--activations", "dynamic"]) == 2
    assert "--activations does not apply to --fp8" in _error(capsys)


def test_fp8_calibrates_amax_by_default_and_refuses_clipping_methods(mlp_path, capsys):
    assert main(["plan", str(mlp_path), "--fp8", "--calib-data", "unused.npz"]) == 0
    assert "(gptq), static per-tensor activations (minmax)" in capsys.readouterr().out
    assert main(["plan", str(mlp_path), "--fp8", "--calib-data", "unused.npz", "--calib-method", "entropy"]) == 2
    assert "minmax or mse" in _error(capsys)


def test_kv_cache_alone_on_a_decoder_and_refused_without_one(mlp_path, tmp_path, capsys):
    path = tmp_path / "decoder.onnx"
    onnx.save(_decoder(), path)
    assert main([str(path), "--kv-cache", "fp8", "--quiet"]) == 0
    model = onnx.load(tmp_path / "decoder.kv-fp8.onnx")
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT8E4M3FN
    assert types["past_key_values.0.key_scale"] == onnx.TensorProto.FLOAT16
    capsys.readouterr()
    assert main([str(mlp_path), "--kv-cache", "int8", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "past key/values" in _error(capsys)


def test_fp8_takes_an_accuracy_target(mlp_path, tmp_path, capsys):
    x = np.random.default_rng(1).normal(size=(12, 1, 3, 32)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    calib = ["--fp8", "--calib-data", str(tmp_path / "c.npz")]
    out = tmp_path / "m.fp8.onnx"
    assert main([str(mlp_path), *calib, "--min-cosine", "0.5", "-o", str(out), "--quiet"]) == 0
    decision = {p.key: p.value for p in onnx.load(out).metadata_props}["qcompile.kept_float"]
    assert '"kept_float": []' in decision and '"bound": 0.5' in decision
    assert main([str(mlp_path), *calib, "--sensitivity-margin", "1", "-o", str(tmp_path / "b.onnx")]) == 2
    assert "go with an accuracy target" in _error(capsys)
    assert main([str(mlp_path), *calib, "--min-cosine", "0.5", "--fallback", "float",
                 "-o", str(tmp_path / "c.onnx")]) == 2
    assert "--fallback does not apply to --fp8" in _error(capsys)
    assert not (tmp_path / "b.onnx").exists() and not (tmp_path / "c.onnx").exists()
