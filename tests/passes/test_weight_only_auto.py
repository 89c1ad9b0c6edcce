"""``--method auto`` (qcompiler.weight_only_auto): the split of the calibration samples, the choice,
and on a synthetic graph that the candidate kept is the one with the lower loss on the held
samples, recomputed here independently (each candidate compiled alone, cosine by numpy)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompiler import weight_only_auto as auto
from qcompiler.config import WeightOnlyConfig
from qcompiler.pipeline import compile_model
from tests import graphs

K, HIDDEN = 64, 128


def test_held_count_and_split():
    assert [auto.held_count(n) for n in (0, 1, 2, 7, 8, 16)] == [0, 0, 1, 1, 2, 4]
    feeds = [{"x": np.full(1, i)} for i in range(8)]
    fit, held = auto.fit_and_held(feeds)  # held: the middle of each half
    assert [int(f["x"][0]) for f in fit] == [0, 1, 3, 4, 5, 7] and [int(f["x"][0]) for f in held] == [2, 6]
    one = [{"x": np.zeros(1)}]
    assert auto.fit_and_held(one) == (one, one)


def test_choose_takes_the_lowest_loss_and_the_first_of_equals():
    assert auto.choose({"a": 0.3, "b": 0.1, "c": 0.2}) == "b"
    assert auto.choose({"a": 0.1, "b": 0.1}) == "a"


def test_objective_is_perplexity_only_for_next_token_logits():
    ids = {"input_ids": np.array([[1, 2, 3]])}
    assert auto.objective_for([ids], [np.zeros((1, 3, 10))]).kind == "ppl"
    assert auto.objective_for([ids], [np.zeros((1, 3, 2))]).kind == "cosine"  # fewer "logits" than ids
    assert auto.objective_for([{"x": np.zeros((1, 3))}], [np.zeros((1, 3, 10))]).kind == "cosine"


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(k=K, n=HIDDEN), path)
    return path


def _feeds(n: int) -> list[dict]:
    x = np.random.default_rng(0).normal(size=(n, 1, 16, K)).astype(np.float32)
    return [{"x": s} for s in x]


def _held_cosine_loss(float_path, quant_path, held) -> float:
    """``1 − mean cosine`` per sample of the output, as the docstring defines it (numpy)."""
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (float_path, quant_path)]
    cos = []
    for feed in held:
        a, b = (s.run(None, feed)[0].reshape(feed["x"].shape[0], -1).astype(np.float64) for s in run)
        cos += list(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    return 1.0 - float(np.mean(cos))


# 2-bit RTN against 4-bit RTN: which loses less is not in doubt, and each compiles in milliseconds.
CANDIDATES = (("rtn 2-bit", dict(method="rtn", bits=2)), ("rtn 4-bit", dict(method="rtn", bits=4)))


@pytest.mark.parametrize("candidates", [CANDIDATES, CANDIDATES[::-1]])
def test_auto_keeps_the_candidate_with_the_lower_held_loss(mlp_path, tmp_path, monkeypatch, candidates):
    monkeypatch.setattr(auto, "CANDIDATES", candidates)
    feeds = _feeds(8)
    out = tmp_path / "mlp.auto.onnx"
    config = WeightOnlyConfig(group_size=32, keep_grid=False)
    result = compile_model(mlp_path, out, config, feeds=lambda: iter(feeds), progress=False)

    fit, held = auto.fit_and_held(feeds)
    expected = {}
    for label, fields in candidates:  # each compiled alone on the fitting samples, scored here
        path = tmp_path / f"{label.replace(' ', '_')}.onnx"
        compile_model(mlp_path, path, WeightOnlyConfig(group_size=32, keep_grid=False, **fields),
                      feeds=lambda: iter(fit), progress=False)
        expected[label] = _held_cosine_loss(mlp_path, path, held)
    meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}[auto.METADATA_KEY])
    assert meta["chosen"] == "rtn 4-bit" == min(expected, key=expected.get)
    assert meta["objective"] == "cosine" and (meta["fit_samples"], meta["held_samples"]) == (6, 2)
    for label, loss in expected.items():
        assert meta["losses"][label] == pytest.approx(loss, rel=1e-6, abs=1e-9)
    assert result.output == out and json.loads(
        {p.key: p.value for p in onnx.load(out).metadata_props}["qcompile.flags"])["bits"] == 4
    assert result.reports[-1].name == "WeightOnlyAutoChoice"
    assert result.reports[-1].summary().startswith("auto chose rtn 4-bit: ")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".qcompile")) == []  # no leftovers
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # the moved file loads


def test_auto_without_calibration_data_is_round_to_nearest(mlp_path, tmp_path):
    result = compile_model(mlp_path, tmp_path / "m.onnx", WeightOnlyConfig(group_size=32), progress=False)
    assert not any(r.name == "WeightOnlyAutoChoice" for r in result.reports)
    assert next(r for r in result.reports if r.name == "QuantizeWeightOnlyPass").note == "2 rtn"


def test_awq_gptq_folds_awq_scales_then_runs_gptq(mlp_path, tmp_path):
    pytest.importorskip("torch")
    from passes.awq import AWQPass
    from passes.quantize_weight_only import QuantizeWeightOnlyPass
    from qcompiler.pipeline import weight_only_passes

    feeds = _feeds(4)
    config = WeightOnlyConfig(method="awq-gptq", group_size=32, keep_grid=False, act_order=True, clip_search=True)
    passes = weight_only_passes(config, lambda: iter(feeds))
    awq_pass = next(p for p in passes if isinstance(p, AWQPass))
    quantize = next(p for p in passes if isinstance(p, QuantizeWeightOnlyPass))
    assert not awq_pass.quantize and quantize.method == "gptq"
    assert passes.index(awq_pass) < passes.index(quantize)
    out = tmp_path / "mlp.awq-gptq.onnx"
    result = compile_model(mlp_path, out, config, feeds=lambda: iter(feeds), progress=False)
    assert next(r for r in result.reports if r.name == "QuantizeWeightOnlyPass").note == "2 gptq"
    assert _held_cosine_loss(mlp_path, out, feeds) < 0.01
