"""qcompile diff and inspect on tiny graphs (structure, matching, numbers against numpy)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import make_model, mlp
from qcompiler import diff, inspect_model, layer_error
from qcompiler.cli import main


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def _compiled_mlp(tmp_path, *flags) -> tuple[str, str]:
    a = _save(mlp(), tmp_path / "mlp.onnx")
    b = tmp_path / "mlp.q.onnx"
    assert main([a, "--w8a8", *flags, "-o", str(b), "--quiet"]) == 0
    return a, str(b)


def test_model_against_itself_is_unchanged(tmp_path):
    a = _save(mlp(), tmp_path / "a.onnx")
    d = diff.diff_models(a, a)
    assert d.unchanged and not d.quantized and not d.layers
    assert diff.format_diff(d)[0].endswith("no change (5 nodes, same weights, opsets and I/O)")


def test_a_changed_weight_value_is_a_change(tmp_path):
    model = mlp()
    a = _save(model, tmp_path / "a.onnx")
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[0, 0] += 1.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    b = _save(model, tmp_path / "b.onnx")
    d = diff.diff_models(a, b)
    assert not d.unchanged and d.values_changed == ["w1"]


def test_every_quantized_matmul_is_listed_once(tmp_path):
    a, b = _compiled_mlp(tmp_path)
    d = diff.diff_models(a, b)
    assert sorted(q.node for q in d.quantized) == ["fc1", "fc2"]
    for q in d.quantized:
        assert q.scheme.startswith("MatMulIntegerToFloat: int8 weights (8-bit, per-channel), per-token")
        assert q.compare_at is not None
    assert not d.unattributed  # every new node traced back to a node of A
    assert d.bytes_b["int8"] == 32 * 48 * 2 and "int8" not in d.bytes_a


def test_owners_follow_derived_names_then_position():
    a = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
         helper.make_node("Relu", ["y"], ["z"], name="act")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        {"w": np.eye(4, dtype=np.float32)})
    owners = diff._Owners(a)
    consts = {"w_quantized": None}
    assert owners.owner(helper.make_node("X", ["q"], ["o"], name="mm.weight_q"), {}) == "mm"
    assert owners.owner(helper.make_node("X", ["w_quantized"], ["o"], name="n1"), consts) == "mm"
    assert owners.owner(helper.make_node("X", ["y"], ["o2"], name="moved_q"), {}) == "mm"  # reads mm's output
    assert owners.owner(helper.make_node("X", ["x"], ["o3"], name="mmx"), {}) is None  # "mm" + "x" is no boundary


def test_numeric_diff_matches_numpy(tmp_path):
    """B = A with W scaled by 1.01: SQNR and cosine at the MatMul output equal the closed form."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 6)).astype(np.float32)
    x = rng.normal(size=(3, 8)).astype(np.float32)

    def model(weight):
        return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                           helper.make_node("Relu", ["y"], ["z"], name="act")],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 6])], {"w": weight})

    a, b = _save(model(w), tmp_path / "a.onnx"), _save(model(w * 1.01), tmp_path / "b.onnx")
    stats, _ = layer_error.compare(a, b, ["y"], [{"x": x}])
    ref, got = x.astype(np.float64) @ w, x.astype(np.float64) @ (w * 1.01).astype(np.float32)
    assert stats["y"].sqnr_db == pytest.approx(20 * math.log10(np.linalg.norm(ref) / np.linalg.norm(ref - got)), abs=1e-3)
    assert stats["y"].cosine == pytest.approx(1.0, abs=1e-6)
    assert stats["y"].max_abs == pytest.approx(np.abs(ref - got).max(), rel=1e-4)


def test_numeric_diff_ranks_the_layer_with_an_outlier_worst(tmp_path):
    """fc1 reads activations with one huge channel: per-tensor static quantization wrecks it.
    fc2's accumulated error carries fc1's; its own error (fed B's input) is the smaller."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _save(mlp(), a)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 1, 2, 32)).astype(np.float32)  # 4 samples of [1, 2, 32]
    x[..., 5] *= 300.0
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    assert main([str(a), "--w8a8", "--calib-data", str(calib), "--no-smoothquant", "-o", str(b), "--quiet"]) == 0
    d = diff.diff_models(a, b)
    rows, outputs = diff.numeric_diff(d, [{"x": sample} for sample in x])
    assert [r.node for r in rows][0] == "fc1"
    first, second = rows
    assert first.local_sqnr_db == pytest.approx(first.sqnr_db)  # fc1 reads the graph input itself
    assert first.local_sqnr_db < second.local_sqnr_db < 200 and second.local_sqnr_db > second.sqnr_db
    assert "y" in outputs


def test_diff_cli_text_and_json(tmp_path, capsys):
    a, b = _compiled_mlp(tmp_path)
    x = np.random.default_rng(0).normal(size=(2, 1, 3, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "d.json"
    assert main(["diff", a, b, "--data", str(tmp_path / "d.npz"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantized layers (2):" in text and "per-layer error" in text
    payload = json.loads(out.read_text())
    assert {r["node"] for r in payload["numeric"]["layers"]} == {"fc1", "fc2"}
    assert all(r["sqnr_db"] > 20 for r in payload["numeric"]["layers"])


def test_diff_and_inspect_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["diff", str(bad), str(bad)]) == 2
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("qcompile: error:") for line in err)


def test_inspect_reports_schemes_and_provenance(tmp_path):
    a, b = _compiled_mlp(tmp_path)
    info = inspect_model.summary(b)
    assert [(s["op_type"], s["count"], s["activations"]) for s in info["quantized_schemes"]] == [
        ("MatMulIntegerToFloat", 2, "per-token")]
    assert info["provenance"]["qcompile.recipe"] == "w8a8"
    assert info["provenance"]["qcompile.flags"]["activations"] == "per-token-sym"
    assert inspect_model.summary(a)["float_weighted_ops"] == ["fc1", "fc2"]
    assert any("provenance: none" in line for line in inspect_model.format_summary(inspect_model.summary(a)))


def test_inspect_weight_only_groups(tmp_path):
    a = _save(mlp(k=64, n=64), tmp_path / "a.onnx")
    b = tmp_path / "b.onnx"
    assert main([a, "--w4a16", "--group-size", "32", "--lm-head-bits", "same", "-o", str(b), "--quiet"]) == 0
    ops = inspect_model.quantized_ops(inspect_model.load_graph_only(b))
    assert {(q.op_type, q.bits, q.granularity) for q in ops} == {("MatMulNBits", 4, "group 32")}
