"""The mixed-precision search and its objectives, against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcompiler import sensitivity as sens
from qcompiler.errors import QCompileError


def _additive(costs: dict[str, float], calls: list | None = None, per_token: dict[str, float] | None = None):
    """loss(F, P) = Σ_{n ∉ F} (per_token[n] if n ∈ P else costs[n]): each layer adds its own loss."""
    per_token = per_token or {}

    def loss(in_float: frozenset[str], tokens: frozenset[str] = frozenset()) -> float:
        assert not in_float & tokens
        if calls is not None:
            calls.append(in_float)
        return sum(per_token[n] if n in tokens else c for n, c in costs.items() if n not in in_float)

    return loss


def test_chooses_the_fewest_layers_by_ablation_not_by_rank():
    costs = {"a": 0.004, "b": 0.0001, "c": 0.006, "d": 0.0002, "e": 0.0001}
    # Ranking puts b first (lowest SQNR) but ablation shows c and a matter.
    sqnr = {"b": 10.0, "c": 12.0, "a": 15.0, "d": 20.0, "e": 30.0}
    decision = sens.choose_precisions(sqnr, _additive(costs), sens.Objective("ppl", 0.1), cap=3, candidates=5)
    assert decision.kept_float == ["c", "a"]
    assert decision.final_loss == pytest.approx(0.0004)
    assert decision.ablation_gain["c"] == pytest.approx(0.006)


def test_nothing_kept_when_the_target_is_already_met():
    calls = []
    decision = sens.choose_precisions({"a": 1.0}, _additive({"a": 0.001}, calls), sens.Objective("ppl", 1.0),
                                        cap=1, candidates=1)
    assert decision.kept_float == [] and calls == [frozenset()]


def test_per_token_rung_first_when_it_is_enough():
    costs = {f"l{i}": 0.01 for i in range(10)}
    sqnr = {n: float(i) for i, n in enumerate(costs)}  # l0 worst
    tokens = {n: 0.001 for n in costs}
    decision = sens.choose_precisions(sqnr, _additive(costs, per_token=tokens), sens.Objective("ppl", 6.0),
                                      cap=2, candidates=4, per_token=list(costs))
    # k per-token layers: 0.1 − 0.009·k ≤ 0.06 → k ≥ 4.44: the five worst-ranked
    assert decision.per_token == ["l0", "l1", "l2", "l3", "l4"] and decision.kept_float == []
    assert decision.final_loss == pytest.approx(0.055)


def test_float_on_top_of_per_token_then_per_token_trimmed():
    costs = {"a": 0.05, "b": 0.02, "c": 0.02, "d": 0.001}
    tokens = {"a": 0.04, "b": 0.002, "c": 0.002, "d": 0.001}  # a needs float; b, c need per-token
    sqnr = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    decision = sens.choose_precisions(sqnr, _additive(costs, per_token=tokens), sens.Objective("ppl", 1.0),
                                      cap=1, candidates=4, per_token=["a", "b", "c", "d"])
    assert decision.kept_float == ["a"]
    assert decision.per_token == ["b", "c"]  # d gains nothing per token: back to static
    assert decision.final_loss == pytest.approx(0.005)
    assert decision.as_dict()["per_token"][0]["node"] == "b"


def test_shortest_prefix_matches_a_linear_scan():
    for most in range(0, 40):
        for first in range(1, most + 2):
            calls = []
            got = sens.shortest_prefix(lambda k: calls.append(k) or k >= first, most)
            assert got == (first if first <= most else None)
            assert len(calls) <= 2 * max(1, most).bit_length() + 1


def test_bisection_finds_the_shortest_prefix():
    costs = {f"l{i}": 0.01 for i in range(20)}
    sqnr = {n: float(i) for i, n in enumerate(costs)}
    calls = []
    decision = sens.choose_precisions(sqnr, _additive(costs, calls), sens.Objective("ppl", 5.5), cap=20, candidates=20)
    assert len(decision.kept_float) == 15  # 0.20 − 15·0.01 = 0.05 ≤ 0.055; 14 leaves 0.06
    searched = [len(f) for f in calls if len(f) > 1]
    assert len(searched) <= 8  # doubling then bisection, not a linear scan


def test_cap_reached_is_a_clear_error():
    costs = {f"l{i}": 0.01 for i in range(10)}
    with pytest.raises(QCompileError, match=r"with the 2 most sensitive of 10 layers in float \(the cap\)"):
        sens.choose_precisions({n: 0.0 for n in costs}, _additive(costs), sens.Objective("ppl", 1.0),
                                 cap=2, candidates=4)


def test_perplexity_loss_matches_numpy():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, size=(1, 6))
    float_logits, quant_logits = rng.normal(size=(1, 6, 7)), rng.normal(size=(1, 6, 7))

    def nll(logits):
        p = np.exp(logits[0, :-1]) / np.exp(logits[0, :-1]).sum(-1, keepdims=True)
        return -np.mean(np.log(p[np.arange(5), ids[0, 1:]]))

    scorer = sens.Scorer(sens.Objective("ppl", 1.0), [{"input_ids": ids}], [float_logits])
    assert scorer.loss([quant_logits]) == pytest.approx(math.exp(nll(quant_logits)) / math.exp(nll(float_logits)) - 1)
    assert scorer.loss([float_logits]) == pytest.approx(0.0, abs=1e-12)


def test_cosine_pools_unmasked_tokens_and_top1_counts_agreement():
    h = np.zeros((2, 3, 2))
    h[0, :2] = [1.0, 0.0]
    h[1, 0] = [0.0, 1.0]
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    noisy = h.copy()
    noisy[0, 2] = [0.0, 100.0]  # a masked position: ignored
    noisy[1, 0] = [1.0, 1.0]
    scorer = sens.Scorer(sens.Objective("cosine", 0.9), [{"attention_mask": mask}], [h])
    assert scorer.loss([noisy]) == pytest.approx(1 - (1.0 + 1 / math.sqrt(2)) / 2)
    top = sens.Scorer(sens.Objective("top1", 0.9), [{}], [np.array([[0.1, 0.9], [0.8, 0.2]])])
    assert top.loss([np.array([[0.2, 0.8], [0.1, 0.9]])]) == pytest.approx(0.5)


def test_margin_adds_standard_errors_of_the_per_sample_terms():
    rng = np.random.default_rng(5)
    ids = [rng.integers(0, 7, size=(1, 6)) for _ in range(5)]
    floats = [rng.normal(size=(1, 6, 7)) for _ in ids]
    quants = [f + rng.normal(0, 0.5, size=f.shape) for f in floats]

    def nll(logits, i):
        p = np.exp(logits[0, :-1]) / np.exp(logits[0, :-1]).sum(-1, keepdims=True)
        return -np.mean(np.log(p[np.arange(5), i[0, 1:]]))

    d = np.array([nll(q, i) - nll(f, i) for q, f, i in zip(quants, floats, ids)])
    scorer = sens.Scorer(sens.Objective("ppl", 1.0), [{"input_ids": i} for i in ids], floats)
    np.testing.assert_allclose(scorer.terms(quants), d, rtol=1e-6)
    assert scorer.loss(quants) == pytest.approx(math.exp(d.mean()) - 1)
    upper = math.exp(d.mean() + 2 * d.std(ddof=1) / math.sqrt(5)) - 1
    assert scorer.loss(quants, margin=2.0) == pytest.approx(upper) and upper > scorer.loss(quants)
    top = sens.Scorer(sens.Objective("top1", 0.9), [{}], [np.array([[0.1, 0.9], [0.8, 0.2]])])
    wrong = np.array([0.0, 1.0])  # one of two rows disagrees: mean 0.5, σ/√2 = 0.5
    assert top.loss([np.array([[0.2, 0.8], [0.1, 0.9]])], margin=1.0) == pytest.approx(0.5 + wrong.std(ddof=1) / math.sqrt(2))
    one = sens.Scorer(sens.Objective("ppl", 1.0), [{"input_ids": ids[0]}], floats[:1])
    assert one.loss(quants[:1], margin=3.0) == pytest.approx(math.exp(d[0]) - 1)  # one term: no spread to add


@pytest.mark.parametrize("kind, bound", [("ppl", -1.0), ("cosine", 0.0), ("top1", 1.5), ("loss", 1.0)])
def test_bad_objectives(kind, bound):
    with pytest.raises(QCompileError):
        sens.Objective(kind, bound)


def test_perplexity_target_needs_a_language_model():
    with pytest.raises(QCompileError, match="input_ids"):
        sens.Scorer(sens.Objective("ppl", 1.0), [{"x": np.zeros((1, 4))}], [np.zeros((1, 4))])
    hidden = np.zeros((1, 3, 8))  # an encoder: [B, S, hidden] with ids beyond "vocab" 8
    with pytest.raises(QCompileError, match="input_ids"):
        sens.Scorer(sens.Objective("ppl", 1.0), [{"input_ids": np.array([[1, 20, 3]])}], [hidden])
