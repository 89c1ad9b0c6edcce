"""SmoothQuantPass on tiny graphs: where the scales are folded, what is refused and why, and that
the rewritten float model computes the same function (ONNX Runtime, fresh inputs)."""

import numpy as np
import pytest
from onnx import numpy_helper

from passes.select_targets import TARGET_KEY, SelectTargetsPass, targets
from passes.smoothquant import EXPLICIT_MUL_GAIN, SMOOTHED_KEY, SmoothQuantPass, channel_map, find_absorber, groups
from qcompiler import ir_utils, smoothing
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir

OPS = ("MatMul", "Gemm")
DIMS = {"B": 1, "S": 8}


def _feeds(proto, count: int, seed: int) -> list[dict]:
    """Random normal feeds for every graph input (symbolic dims: B=1, S=8)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for value in proto.graph.input:
            shape = [d.dim_value or DIMS[d.dim_param] for d in value.type.tensor_type.shape.dim]
            feed[value.name] = rng.normal(size=shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def _smooth(proto, scheme="static", enabled=True, exclude=(), feeds=None, model=None, alpha=None):
    """Annotate, then run SmoothQuant on ``model`` (default: a fresh IR copy of ``proto``).
    Static schemes cross-validate the α search on two halves of the feeds: on these few random
    rows it may well keep no smoothing, so tests of the rewrite itself fix ``alpha``."""
    if model is None:
        model = to_ir(proto)
        SelectTargetsPass(OPS, exclude)(model)
    feeds = _feeds(proto, 4, seed=0) if feeds is None else feeds
    sq = SmoothQuantPass(lambda: iter(feeds), scheme, alpha, enabled=enabled, progress=False)
    result = sq(model)
    return model, sq, result


def _assert_same_function(proto, model, rtol=1e-4):
    """Original and rewritten models agree on inputs the calibration never saw."""
    for feed in _feeds(proto, 2, seed=123):
        expected, actual = run(proto, feed), run(model, feed)
        assert len(expected) == len(actual)
        for a, b in zip(expected, actual):
            assert np.abs(a - b).max() <= rtol * np.abs(a).max()


def _initializer(proto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def _array(model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def _decision(sq, layers: str) -> dict:
    return next(d for d in sq.decisions if d["layers"] == layers)


def _layer_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=-1, keepdims=True) + eps) * gamma + beta


def _assert_records_match_graph(model):
    for t in targets(model):
        np.testing.assert_array_equal(t.weight, ir_utils.constant_through_views(t.node.inputs[1]), err_msg=t.node.name)


# --- folding into norms -------------------------------------------------------------------------


def test_layernorm_absorbs_the_scales_of_q_k_v():
    proto = graphs.layernorm_qkv()
    feeds = _feeds(proto, 4, seed=0)
    model, sq, result = _smooth(proto, feeds=feeds)
    assert result.modified
    check(model)
    assert op_types(model) == [n.op_type for n in proto.graph.node]  # no Mul added
    decision = _decision(sq, "q_proj,k_proj,v_proj")
    assert decision["absorber"] == "LayerNormalization" and decision["alpha"] in smoothing.ALPHA_GRID
    assert decision["error"] < decision["unsmoothed_error"]
    assert "folded into LayerNormalization" in sq.summary

    gamma, beta = _initializer(proto, "gamma"), _initializer(proto, "beta")
    s = gamma / _array(model, "gamma")  # LN now produces X/s: γ/s, β/s
    assert not np.allclose(s, 1.0)
    np.testing.assert_allclose(_array(model, "beta"), beta / s, rtol=1e-5)
    for name in ("wq", "wk", "wv"):  # the weights take s on their input rows
        np.testing.assert_allclose(_array(model, name), _initializer(proto, name) * s[:, None], rtol=1e-5)
    # s is the formula on the LayerNorm output's channel maxima (numpy) and the stacked weights
    x_absmax = np.abs(np.concatenate([_layer_norm(f["x"], gamma, beta).reshape(-1, 16) for f in feeds])).max(axis=0)
    w_absmax = np.abs(np.concatenate([_initializer(proto, n) for n in ("wq", "wk", "wv")], axis=1)).max(axis=1)
    np.testing.assert_allclose(s, x_absmax ** decision["alpha"] / w_absmax ** (1 - decision["alpha"]), rtol=1e-4)
    _assert_same_function(proto, model)


def test_rmsnorm_and_swiglu_fold_into_the_norm_and_the_up_projection():
    proto = graphs.rmsnorm_swiglu()
    model, sq, result = _smooth(proto)
    assert result.modified
    check(model)
    assert op_types(model) == [n.op_type for n in proto.graph.node]
    assert _decision(sq, "gate_proj,up_proj")["absorber"] == "RMSNorm"
    down = _decision(sq, "down_proj")
    # silu(gate) reads gate twice (Sigmoid and Mul): only up can take 1/t on its columns
    assert down["absorber"].startswith("linear up_proj") and "gate" not in down["absorber"]
    assert down["alpha"] is not None
    assert "folded into RMSNorm" in sq.summary and "folded into linear" in sq.summary

    s = _initializer(proto, "gamma") / _array(model, "gamma")
    t = _array(model, "w_down")[:, 0] / _initializer(proto, "w_down")[:, 0]
    assert not np.allclose(s, 1.0) and not np.allclose(t, 1.0)
    np.testing.assert_allclose(_array(model, "w_gate"), _initializer(proto, "w_gate") * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(_array(model, "w_up"), _initializer(proto, "w_up") * s[:, None] / t[None, :], rtol=1e-5)
    np.testing.assert_allclose(_array(model, "w_down"), _initializer(proto, "w_down") * t[:, None], rtol=1e-5)
    _assert_same_function(proto, model)


# --- folding into a linear producer through the attention path -------------------------------------


def test_attention_o_proj_folds_into_the_v_projection_and_its_bias():
    proto = graphs.attention_v_o()
    model, sq, result = _smooth(proto, exclude=("v_proj",))
    assert result.modified
    check(model)
    assert op_types(model) == [n.op_type for n in proto.graph.node]
    decision = _decision(sq, "o_proj")
    assert decision["absorber"].startswith("linear v_proj") and "MatMul" in decision["absorber"]
    t = _array(model, "wo")[:, 0] / _initializer(proto, "wo")[:, 0]  # heads × head_dim = v's channels
    assert not np.allclose(t, 1.0)
    np.testing.assert_allclose(_array(model, "wv"), _initializer(proto, "wv") / t[None, :], rtol=1e-5)
    np.testing.assert_allclose(_array(model, "bv"), _initializer(proto, "bv") / t, rtol=1e-5)
    _assert_same_function(proto, model)


def test_grouped_query_heads_share_the_scale_of_their_value_head():
    heads, kv_heads, head_dim = 6, 2, 4
    proto = graphs.attention_v_o(heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    model, sq, result = _smooth(proto, exclude=("v_proj",), alpha=0.5)
    assert result.modified
    assert "Expand" in _decision(sq, "o_proj")["absorber"]
    s = _array(model, "wo")[:, 0] / _initializer(proto, "wo")[:, 0]  # [heads·head_dim]
    t = _initializer(proto, "wv")[0] / _array(model, "wv")[0]  # [kv_heads·head_dim]
    head, d = np.divmod(np.arange(heads * head_dim), head_dim)
    source = head // (heads // kv_heads) * head_dim + d  # query head h reads value head h // 3
    np.testing.assert_allclose(s, t[source], rtol=1e-5)
    _assert_same_function(proto, model)


# --- refusals ------------------------------------------------------------------------------------


def _group(proto, layers: str):
    model = to_ir(proto)
    SelectTargetsPass(OPS)(model)
    return model, next(g for g in groups(model) if g.name == layers)


def test_a_shared_layernorm_scale_is_not_an_absorber():
    _, group = _group(graphs.layernorm_qkv(shared_gamma=True), "q_proj,k_proj,v_proj")
    absorber, reason = find_absorber(group)
    assert absorber is None and "shared" in reason and "gamma" in reason
    assert group.absorber is None and group.refusal == reason
    _, free = _group(graphs.layernorm_qkv(), "q_proj,k_proj,v_proj")
    assert find_absorber(free)[0] is not None  # the same graph without the second reader


def test_an_activation_read_by_a_residual_is_not_smoothed_in_place():
    proto = graphs.layernorm_qkv(residual=True)
    _, group = _group(proto, "q_proj,k_proj,v_proj")
    absorber, reason = find_absorber(group)
    assert absorber is None and "also read by" in reason and "residual" in reason
    model, sq, _ = _smooth(proto)  # whatever it does instead, the LayerNorm stays as it was
    np.testing.assert_array_equal(_array(model, "gamma"), _initializer(proto, "gamma"))
    np.testing.assert_array_equal(_array(model, "beta"), _initializer(proto, "beta"))
    assert _decision(sq, "q_proj,k_proj,v_proj")["refusal"] == reason
    _assert_same_function(proto, model)


def test_gate_is_refused_as_absorber_because_sigmoid_reads_it():
    _, group = _group(graphs.rmsnorm_swiglu(), "down_proj")
    absorber, reason = find_absorber(group)
    assert absorber.node.name == "up_proj" and reason == ""
    assert [n.name for n in absorber.path] == ["glu"]


def test_graph_input_activation_has_no_absorber():
    _, group = _group(graphs.relu_outliers(), "fc1")
    assert find_absorber(group) == (None, "the activation is a graph input")


# --- explicit Mul, auto mode, idempotence ---------------------------------------------------------


def test_no_absorber_and_strong_outliers_gives_an_explicit_mul():
    proto = graphs.relu_outliers()
    model, sq, result = _smooth(proto, scheme="per-token", exclude=("fc1",))  # a searched α, a clear gain
    assert result.modified
    check(model)
    assert op_types(model) == ["MatMul", "Relu", "Mul", "MatMul"]
    mul, fc2 = list(model.graph)[2:]
    assert mul.inputs[0].name == "a" and fc2.inputs[0] is mul.outputs[0]
    decision = _decision(sq, "fc2")
    assert decision["absorber"] == "explicit Mul" and "Relu" in decision["refusal"]
    assert decision["unsmoothed_error"] >= EXPLICIT_MUL_GAIN * decision["error"]
    s = _array(model, "w2")[:, 0] / _initializer(proto, "w2")[:, 0]
    np.testing.assert_allclose(ir_utils.constant_array(mul.inputs[1]), 1.0 / s, rtol=1e-5)
    _assert_same_function(proto, model)


def test_auto_mode_leaves_even_activations_alone():
    proto = graphs.layernorm_qkv(outliers=())
    model, sq, result = _smooth(proto, enabled=None)
    assert not result.modified
    assert "not applied" in sq.summary and sq.decisions == []
    for name in ("gamma", "beta", "wq", "wk", "wv"):
        np.testing.assert_array_equal(_array(model, name), _initializer(proto, name))
    assert all(SMOOTHED_KEY not in n.meta for n in model.graph)


def test_auto_mode_smooths_outlier_channels():
    proto = graphs.rmsnorm_swiglu()
    model, sq, result = _smooth(proto, enabled=None)
    assert result.modified and "outlier ratio" in sq.summary
    applied = [d for d in sq.decisions if d["alpha"] is not None]
    assert applied and all(d["error"] < d["unsmoothed_error"] for d in applied)
    _assert_same_function(proto, model)


def test_second_run_changes_nothing():
    proto = graphs.rmsnorm_swiglu()
    model, _, first = _smooth(proto)
    assert first.modified
    assert all(SMOOTHED_KEY in t.node.meta for t in targets(model))
    arrays = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    _, sq, second = _smooth(proto, model=model)
    assert not second.modified
    assert op_types(model) == [n.op_type for n in proto.graph.node]
    for name, array in arrays.items():
        np.testing.assert_array_equal(_array(model, name), array)
    _assert_same_function(proto, model)


def _integer_feeds(count: int, seed: int) -> list[dict]:
    """Integer rows in [-127, 127] each holding ±127: int8 per-token-sym represents them exactly."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.integers(-126, 127, size=(1, 8, 16)).astype(np.float32)
        x[0, np.arange(8), rng.integers(0, 16, 8)] = 127.0 * rng.choice([-1.0, 1.0], 8)
        feeds.append({"x": x})
    return feeds


def test_same_pass_instance_run_twice_reports_no_change():
    proto = graphs.relu_outliers(sign_weights=True)  # fc1: weights and inputs quantize exactly
    model = to_ir(proto)
    SelectTargetsPass(OPS)(model)
    feeds = _integer_feeds(4, seed=0)
    sq = SmoothQuantPass(lambda: iter(feeds), "per-token-sym", enabled=True, progress=False)
    assert sq(model).modified
    fc1 = _decision(sq, "fc1")
    assert fc1["alpha"] is None and fc1["unsmoothed_error"] == 0.0  # left: nothing to gain
    nodes = op_types(model)
    second = sq(model)  # fc1 is searched again (still no gain); nothing changes
    assert op_types(model) == nodes
    assert not second.modified


# --- the target records stay in step with the graph -------------------------------------------------


@pytest.mark.parametrize("build", [
    graphs.rmsnorm_swiglu,  # up_proj: a target (rows ×s) and down's absorber (columns ÷t)
    graphs.attention_v_o,  # v_proj: a target and o's absorber
    lambda: graphs.attention_v_o(heads=6, kv_heads=2),
    graphs.layernorm_qkv,
    graphs.relu_outliers,
], ids=["swiglu", "attention", "gqa", "layernorm", "relu"])
def test_target_records_equal_the_graph_weights(build):
    proto = build()
    model, _, result = _smooth(proto, alpha=0.5)
    assert result.modified
    _assert_records_match_graph(model)
    _assert_same_function(proto, model)


# --- the channel map probe ------------------------------------------------------------------------


def test_channel_map_of_a_grouped_query_repeat():
    kv_heads, repeat, head_dim = 2, 3, 4
    head = np.repeat(np.arange(kv_heads), repeat)  # query heads 0,1,2 read value head 0; 3,4,5 head 1
    pi = (head[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
    weights = np.random.default_rng(0).uniform(0.2, 2.0, (5, 1))  # e.g. softmax row sums: any positive factor
    ones = np.broadcast_to(weights, (5, pi.size))
    ids = weights * (pi + 1)
    tied, reason = channel_map(ones.reshape(1, 5, -1), ids.reshape(1, 5, -1))
    assert reason == ""
    np.testing.assert_array_equal(tied, pi)
    identity, _ = channel_map(np.ones((3, 8)), np.tile(np.arange(1.0, 9.0), (3, 1)))
    np.testing.assert_array_equal(identity, np.arange(8))


def test_channel_map_refuses_paths_that_mix_channels():
    rng = np.random.default_rng(1)
    mixing = rng.uniform(0, 1, (8, 8))
    ones = np.ones((4, 8)) @ mixing
    ids = np.tile(np.arange(1.0, 9.0), (4, 1)) @ mixing
    tied, reason = channel_map(ones, ids)
    assert tied is None and "mixes channels" in reason
    # integer ratios, but not the same channel in every row
    ids = np.stack([np.arange(1.0, 9.0), np.arange(1.0, 9.0)[::-1], np.arange(1.0, 9.0)])
    tied, reason = channel_map(np.ones((3, 8)), ids)
    assert tied is None and "mixes channels" in reason
    ones = np.ones((3, 8))
    ones[:, 5] = 0.0
    tied, reason = channel_map(ones, np.tile(np.arange(1.0, 9.0), (3, 1)) * ones)
    assert tied is None and "zeroes" in reason


# --- a source bug: absorber constants produced by Constant nodes ------------------------------------


def test_a_scale_held_by_a_constant_node_is_folded_for_real():
    from passes.canonicalize import CanonicalizePass

    proto = graphs.relu_outliers(scale_constant=0.5)
    model = to_ir(proto)
    CanonicalizePass()(model)  # as in the pipeline: a scalar Constant is not lifted
    SelectTargetsPass(OPS, exclude=("fc1",))(model)
    _, sq, result = _smooth(proto, model=model, alpha=0.5)
    assert result.modified and _decision(sq, "fc2")["absorber"] == "per-channel Mul"
    _assert_same_function(proto, model)


# --- what the α search observes ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme, halves", [("static", True), ("per-token", False)])
def test_static_search_observes_the_two_halves_of_the_samples(scheme, halves):
    proto = graphs.relu_outliers()
    feeds = _feeds(proto, 6, seed=1)
    model = to_ir(proto)
    SelectTargetsPass(OPS, exclude=("fc1",))(model)
    sq = SmoothQuantPass(lambda: iter(feeds), scheme, progress=False)
    activation = groups(model)[0].activation
    folds = sq._observe(model, [activation])[activation.name]
    w1 = _initializer(proto, "w1")
    seen = [np.maximum(f["x"].reshape(-1, w1.shape[0]) @ w1, 0) for f in feeds]
    parts = [seen[:3], seen[3:]] if halves else [seen]
    assert len(folds) == len(parts)
    for fold, part in zip(folds, parts):
        rows = np.concatenate(part)
        np.testing.assert_allclose(fold.channels.hi, rows.max(axis=0), rtol=1e-5)
        np.testing.assert_allclose(fold.channels.lo, rows.min(axis=0), atol=1e-6)
        assert fold.row_weights.sum() == pytest.approx(len(rows))
