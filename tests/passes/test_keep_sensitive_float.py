"""KeepSensitiveFloatPass on a two-layer MLP whose first layer reads an outlier channel."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx import TensorProto, helper

from graphs import make_model
from passes.keep_sensitive_float import DECISION_KEY, KeepSensitiveFloatPass
from qcompiler import pipeline
from qcompiler.cli import main
from qcompiler.config import W8A8Config
from qcompiler.errors import QCompileError
from qcompiler.sensitivity import Objective
from runtime.session import create_session


def mlp() -> onnx.ModelProto:
    """x[B,S,32] → fc1 → Relu → fc2 → y. fc1 ignores input channel 5 (zero weights), whose
    outliers still set its per-tensor activation range: quantized, fc1 loses its signal."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.2, (32, 48)).astype(np.float32)
    w1[5] = 0.0
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["a"], name="relu"),
         helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 16])],
        {"w1": w1, "w2": rng.normal(0, 0.2, (48, 16)).astype(np.float32)})


def _samples(n: int = 12) -> list[dict]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 1, 8, 32)).astype(np.float32)
    x[..., 5] *= 300.0  # fc1's input: one channel ~300× the rest
    return [{"x": s} for s in x]


def _compile(tmp_path, objective, fraction=0.5):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    config = W8A8Config(activations="static", smoothquant=False, accuracy_target=objective,
                        max_float_fraction=fraction)
    out = tmp_path / "mlp.mixed.onnx"
    feeds = _samples()
    pipeline.compile_model(src, out, config, feeds=lambda: iter(feeds), progress=False)
    return src, out, feeds


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_keeps_the_outlier_layer_in_float(tmp_path):
    src, out, feeds = _compile(tmp_path, Objective("cosine", 0.9999))
    model = onnx.load(out)
    decision = __import__("json").loads({p.key: p.value for p in model.metadata_props}[DECISION_KEY])
    assert [d["node"] for d in decision["kept_float"]] == ["fc1"]
    fc1 = next(n for n in model.graph.node if n.name == "fc1")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert fc1.op_type == "MatMul" and fc1.input[0] == "x"
    np.testing.assert_array_equal(weights[fc1.input[1]], onnx.numpy_helper.to_array(mlp().graph.initializer[0]))
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in model.graph.node) == 1  # fc2 still int8
    ref, got = create_session(str(src)), create_session(str(out))
    cos = np.mean([_cosine(ref.run(None, f)[0], got.run(None, f)[0]) for f in feeds])
    assert cos >= 0.9999


def test_met_target_changes_nothing(tmp_path):
    _, out, _ = _compile(tmp_path, Objective("cosine", 0.5))
    model = onnx.load(out)
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in model.graph.node) == 2


def test_unreachable_target_fails_with_one_line(tmp_path):
    with pytest.raises(QCompileError, match="raise --max-float-fraction"):
        _compile(tmp_path, Objective("cosine", 0.9999), fraction=0.0)


def test_second_run_is_not_modified(tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    feeds = _samples()
    config = W8A8Config(activations="static", smoothquant=False, accuracy_target=Objective("cosine", 0.9999),
                        max_float_fraction=0.5)
    model = ir.load(str(src))
    passes = pipeline.quantization_passes(config, lambda: iter(feeds), progress=False)
    pipeline.run_passes(model, passes)
    keep = next(p for p in passes if isinstance(p, KeepSensitiveFloatPass))
    assert keep.decision.kept_float == ["fc1"]
    assert not keep(model).modified


def test_cli_flags(tmp_path, capsys):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    np.savez(tmp_path / "c.npz", x=np.stack([f["x"] for f in _samples()]))
    out = tmp_path / "o.onnx"
    assert main([str(src), "--w8a8", "--calib-data", str(tmp_path / "c.npz"), "--no-smoothquant",
                 "--min-cosine", "0.9999", "--max-float-fraction", "0.5", "-o", str(out), "--quiet"]) == 0
    assert main(["plan", str(src), "--w8a8", "--calib-data", str(tmp_path / "c.npz"), "--min-cosine", "0.9",
                 "--max-float-fraction", "0.5"]) == 0
    assert "per-token activations first, then float (at most 1 of 2 layers in float)" in capsys.readouterr().out
    assert main([str(src), "--w8a8", "--max-ppl-increase", "1", "-o", str(out)]) == 2
    assert main([str(src), "--w8a8", "--calib-data", str(tmp_path / "c.npz"), "--min-cosine", "0.9",
                 "--min-top1-agreement", "0.9", "-o", str(out)]) == 2
    assert main([str(src), "--w4a16", "--min-cosine", "0.9", "-o", str(out)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("qcompile: error:") for e in errors)


def one_layer() -> onnx.ModelProto:
    """x[B,S,32] → fc → y: a single MatMul (for an exact reference of its per-token lowering)."""
    rng = np.random.default_rng(1)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 24])],
        {"w": rng.normal(0, 0.2, (32, 24)).astype(np.float32)})


def _sink_samples(n: int = 12) -> list[dict]:
    """Token 0 of every sample is ~100× the others (an attention-sink token): a per-tensor scale
    set by it leaves the other tokens a few levels; per-token scales follow each token."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, 1, 8, 32)).astype(np.float32)
    x[:, :, 0] *= 100.0
    return [{"x": s} for s in x]


def _per_token_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """numpy: asymmetric uint8 per-row activations (``passes.dynamic_activations``) times
    symmetric int8 per-column weights."""
    w_scale = np.abs(w).max(axis=0) / 127.0
    w_hat = np.round(w / w_scale) * w_scale
    low, high = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    scale = (high - low) / 255.0
    x_hat = np.round((x - low) / scale) * scale + low
    return x_hat @ w_hat


def test_per_token_rung_fixes_a_sink_token_without_float(tmp_path):
    # top-1 over each token's 24 outputs: static 0.56 (the sink sets the scale), per-token 1.0
    src, out = tmp_path / "fc.onnx", tmp_path / "fc.mixed.onnx"
    onnx.save(one_layer(), src)
    feeds = _sink_samples()
    config = W8A8Config(activations="static", smoothquant=False, accuracy_target=Objective("top1", 0.95))
    pipeline.compile_model(src, out, config, feeds=lambda: iter(feeds), progress=False)
    model = onnx.load(out)
    decision = __import__("json").loads({p.key: p.value for p in model.metadata_props}[DECISION_KEY])
    assert [d["node"] for d in decision["per_token"]] == ["fc"] and decision["kept_float"] == []
    assert {"ReduceMin", "MatMulIntegerToFloat"} <= {n.op_type for n in model.graph.node}
    assert not any(n.op_type in ("DequantizeLinear", "QLinearMatMul") for n in model.graph.node)  # static path gone
    w = onnx.numpy_helper.to_array(one_layer().graph.initializer[0])
    got = create_session(str(out))
    for feed in feeds:
        np.testing.assert_allclose(got.run(None, feed)[0], _per_token_reference(feed["x"], w), rtol=1e-4, atol=1e-4)


def test_fallback_float_keeps_the_old_ladder(tmp_path):
    src, out = tmp_path / "fc.onnx", tmp_path / "fc.float.onnx"
    onnx.save(one_layer(), src)
    feeds = _sink_samples()
    config = W8A8Config(activations="static", smoothquant=False, accuracy_target=Objective("top1", 0.95),
                        max_float_fraction=1.0, fallback="float")
    pipeline.compile_model(src, out, config, feeds=lambda: iter(feeds), progress=False)
    decision = __import__("json").loads({p.key: p.value for p in onnx.load(out).metadata_props}[DECISION_KEY])
    assert [d["node"] for d in decision["kept_float"]] == ["fc"] and decision["per_token"] == []
    with pytest.raises(QCompileError, match="--fallback per-token is an ONNX Runtime CPU lowering"):
        W8A8Config(activations="static", target="qdq", fallback="per-token")


def test_target_is_measured_on_samples_the_ranges_never_saw(tmp_path):
    from qcompiler.calibration import split_feeds

    held, rest = split_feeds(lambda: iter(range(6)), 4)  # (2i + 1)·6 // 8
    assert list(held()) == [0, 2, 3, 5] and list(rest()) == [1, 4]
    held, rest = split_feeds(lambda: iter(range(24)), 8)
    assert list(held()) == [1, 4, 7, 10, 13, 16, 19, 22] and len(list(rest())) == 16
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    feeds = _samples(4)
    config = W8A8Config(activations="static", smoothquant=False, accuracy_target=Objective("cosine", 0.9999))
    with pytest.raises(QCompileError, match=r"measured on 8 calibration samples held apart.*\(got 4\)"):
        pipeline.compile_model(src, tmp_path / "o.onnx", config, feeds=lambda: iter(feeds), progress=False)


def test_smoothquant_alpha_is_searched_for_the_rung_below_static():
    from qcompiler.pipeline import _smoothing_scheme

    target = Objective("ppl", 1.0)
    assert _smoothing_scheme(W8A8Config(activations="static", accuracy_target=target)) == "per-token"
    assert _smoothing_scheme(W8A8Config(activations="static", accuracy_target=target, fallback="float")) == "static"
    assert _smoothing_scheme(W8A8Config(activations="static", accuracy_target=target, smoothquant_alpha=0.8)) == "static"
    assert _smoothing_scheme(W8A8Config(activations="static")) == "static"


@pytest.mark.parametrize("scheme", ["per-token", "per-token-sym"])
def test_switchboard_simulates_the_per_token_lowering(scheme):
    """The search's float simulation T(x) equals numpy's per-token quantization (the lowering's
    numbers, checked against the same reference above)."""
    from passes.keep_sensitive_float import _Switchboard, _switches

    feeds = _sink_samples()
    model = ir.from_proto(one_layer())
    config = W8A8Config(activations="static", smoothquant=False)
    pipeline.run_passes(model, pipeline.quantization_passes(config, lambda: iter(feeds), progress=False)[:6])  # up to InsertStaticQDQPass
    board = _Switchboard(model, _switches(model), None, scheme)
    w = onnx.numpy_helper.to_array(one_layer().graph.initializer[0])
    got = board.run(feeds, frozenset(), frozenset({"fc"}), ["y"])
    for feed, y in zip(feeds, got):
        x = feed["x"]
        if scheme == "per-token":
            want = _per_token_reference(x, w)
        else:
            w_scale = np.abs(w).max(axis=0) / 127.0
            x_scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
            want = (np.round(x / x_scale) * x_scale) @ (np.round(w / w_scale) * w_scale)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def embedded() -> onnx.ModelProto:
    """ids[B,S] → Gather(table [4096, 64], 1 MB: quantized per row by default) → fc → y."""
    rng = np.random.default_rng(7)
    table = rng.normal(size=(4096, 64)).astype(np.float32)  # the table's int8 error ~ the activation's
    return make_model(
        [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 32])],
        {"table": table, "w": rng.normal(0, 0.2, (64, 32)).astype(np.float32)})


@pytest.mark.parametrize("margin", [0.0, 1.5])
def test_target_is_measured_on_the_model_as_it_runs(tmp_path, margin):
    # The held samples' loss the search reports for "nothing moved" is the compiled model's own,
    # embedding table quantized too: 1 − cosine per sample, plus ``margin`` standard errors (numpy).
    from qcompiler.calibration import held_indices

    src, out = tmp_path / "emb.onnx", tmp_path / "emb.q.onnx"
    onnx.save(embedded(), src)
    rng = np.random.default_rng(8)
    feeds = [{"ids": rng.integers(0, 4096, size=(1, 16))} for _ in range(12)]
    config = W8A8Config(activations="static", smoothquant=False, accuracy_target=Objective("cosine", 0.5),
                        sensitivity_margin=margin)
    pipeline.compile_model(src, out, config, feeds=lambda: iter(feeds), progress=False)
    model = onnx.load(out)
    assert {"Gather", "Cast", "Mul"} <= {n.op_type for n in model.graph.node}  # the table is int8
    decision = __import__("json").loads({p.key: p.value for p in model.metadata_props}[DECISION_KEY])
    ref, got = create_session(str(src)), create_session(str(out))
    held = [feeds[i] for i in held_indices(12, W8A8Config.sensitivity_samples)]
    terms = np.array([1 - _cosine(ref.run(None, f)[0], got.run(None, f)[0]) for f in held])
    expected = terms.mean() + margin * terms.std(ddof=1) / np.sqrt(len(terms))
    assert decision["final_loss"] == pytest.approx(expected, rel=1e-4)


def test_sensitivity_margin_flag(tmp_path, capsys):
    src, out = tmp_path / "mlp.onnx", tmp_path / "o.onnx"
    onnx.save(mlp(), src)
    np.savez(tmp_path / "c.npz", x=np.stack([f["x"] for f in _samples()]))
    common = [str(src), "--w8a8", "--calib-data", str(tmp_path / "c.npz"), "-o", str(out), "--quiet"]
    assert main([*common, "--sensitivity-margin", "1"]) == 2  # no target to spare it for
    assert main([*common, "--min-cosine", "0.9", "--sensitivity-margin", "-1"]) == 2
    assert not out.exists()
    errors = capsys.readouterr().err.strip().splitlines()
    assert "go with an accuracy target" in errors[0] and "[0, 10]" in errors[1]
    assert main([*common, "--no-smoothquant", "--min-cosine", "0.9999", "--max-float-fraction", "0.5",
                 "--sensitivity-margin", "2"]) == 0
    decision = __import__("json").loads({p.key: p.value for p in onnx.load(out).metadata_props}[DECISION_KEY])
    assert decision["margin_standard_errors"] == 2.0


def test_fp8_target_keeps_layers_float_and_measures_the_model_as_it_runs(tmp_path):
    from qcompiler.calibration import held_indices
    from qcompiler.config import FP8Config

    src, out = tmp_path / "mlp.onnx", tmp_path / "mlp.fp8.onnx"
    onnx.save(mlp(), src)
    feeds = _samples()
    config = FP8Config(method="rtn", lm_head=True,  # fc2 makes the output: quantized too
                       accuracy_target=Objective("cosine", 0.9992), max_float_fraction=0.5)
    pipeline.compile_model(src, out, config, feeds=lambda: iter(feeds), progress=False)
    model = onnx.load(out)
    decision = __import__("json").loads({p.key: p.value for p in model.metadata_props}[DECISION_KEY])
    kept = [d["node"] for d in decision["kept_float"]]
    assert len(kept) == 1
    weights = {t.name: t for t in model.graph.initializer}
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in mlp().graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "MatMul"):
        if node.name in kept:  # float activation and the original float weight
            assert weights[node.input[1]].data_type == TensorProto.FLOAT
            assert node.input[0] in ("x", "a")
            original = originals["w1" if node.name == "fc1" else "w2"]
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(weights[node.input[1]]), original)
        else:  # still E4M3 weights behind DequantizeLinear
            dq = next(n for n in model.graph.node if node.input[1] in n.output)
            assert dq.op_type == "DequantizeLinear"
            assert weights[dq.input[0]].data_type == TensorProto.FLOAT8E4M3FN
    ref, got = create_session(str(src)), create_session(str(out))
    held = [feeds[i] for i in held_indices(len(feeds), FP8Config.sensitivity_samples)]
    terms = np.array([1 - _cosine(ref.run(None, f)[0], got.run(None, f)[0]) for f in held])
    assert decision["final_loss"] == pytest.approx(terms.mean(), rel=1e-4)
    assert 1 - terms.mean() >= 0.9992 > 1 - decision["loss_by_choice"]["none"]  # all fp8: not met
