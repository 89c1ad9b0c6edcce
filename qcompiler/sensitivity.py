"""Sensitivity-driven mixed precision: the gentlest change of precision that meets an accuracy target.

A static W8A8 layer can move up two rungs: to **per-token** activations (int8 still, with a
scale per row computed at run time: it follows the tokens a calibrated scale cannot) or to
**float**. The search, given ``loss(F, P)`` — the accuracy loss of the model with the layers
``F`` in float and ``P`` per token (perplexity increase, ``1 − cosine`` or ``1 − top-1
agreement``, measured on calibration data):

1. **Rank** the quantized layers by their own error: the SQNR of each layer's output against the
   same layer in float, both fed the quantized model's activation (lowest first).
2. **Per token first**: the shortest prefix of that ranking (among the layers that can run per
   token) whose loss meets the target. No float layer is needed when one exists.
3. Otherwise, with every such layer per token, **confirm** the ranking by ablation: for the
   ``candidates`` worst layers, the loss with that one layer in float; order them by how much
   loss that removes. Then **choose** the shortest prefix of that order whose loss meets the
   target, never more than ``cap`` layers. When even ``cap`` layers do not, say so.
4. With those float layers, move back to static the layers that no longer need per-token
   scales: keep the shortest prefix of the ranking per token that still meets the target.

Losses are measured against the float model's outputs (``passes.float_reference``) on samples
held apart from the ranges and spread over them. A few samples only sketch new data (SmolLM2
W8A8 per token, 8 windows: increases of 0.0–8.0% per window), so a margin can be asked for:
each loss then is an upper estimate, ``margin`` standard errors of the mean above the samples'
mean (``Scorer.loss``).

Shortest prefixes are found by doubling (1, 2, 4, … layers), then a bisection between the last
that failed and the first that met the target (``shortest_prefix``). The graph plumbing (a
model whose layers switch precision by boolean inputs, so one ONNX Runtime session measures
every choice) is ``passes.keep_sensitive_float``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence

import numpy as np

from qcompiler import quant_math as qm
from qcompiler.errors import QCompileError

OBJECTIVES = ("ppl", "cosine", "top1")


@dataclasses.dataclass(frozen=True)
class Objective:
    """An accuracy target. ``kind``: ``ppl`` (``bound``: the largest perplexity increase, in
    percent), ``cosine`` (the smallest mean cosine of the output, per sample, mean-pooled over
    unmasked tokens for ``[batch, seq, hidden]`` outputs) or ``top1`` (the smallest fraction of
    samples whose arg-max agrees with float)."""

    kind: str
    bound: float

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise QCompileError(f"unknown accuracy target {self.kind!r}")
        if self.kind == "ppl" and not 0 <= self.bound < 1000:
            raise QCompileError(f"--max-ppl-increase is a percentage ≥ 0, got {self.bound}")
        if self.kind in ("cosine", "top1") and not 0 < self.bound <= 1:
            flag = "--min-cosine" if self.kind == "cosine" else "--min-top1-agreement"
            raise QCompileError(f"{flag} must be in (0, 1], got {self.bound}")

    @property
    def limit(self) -> float:
        """The largest acceptable loss."""
        return self.bound / 100.0 if self.kind == "ppl" else 1.0 - self.bound

    def describe(self, loss: float) -> str:
        if self.kind == "ppl":
            return f"perplexity +{100 * loss:.2f}% (target ≤ +{self.bound:g}%)"
        label = "mean cosine" if self.kind == "cosine" else "top-1 agreement"
        return f"{label} {1 - loss:.5f} (target ≥ {self.bound:g})"


def is_next_token_logits(feeds: Sequence[dict], outputs: Sequence[np.ndarray]) -> bool:
    """Whether every output is logits ``[B, S, V]`` over the vocabulary of its feed's
    ``input_ids``: what a perplexity can be measured on."""
    return all("input_ids" in f and o.ndim == 3 and o.shape[-1] > int(np.max(f["input_ids"]))
               for f, o in zip(feeds, outputs))


class Scorer:
    """Turns a model's outputs on the calibration samples into the objective's loss, against
    the float model's outputs given once."""

    def __init__(self, objective: Objective, feeds: Sequence[dict], float_outputs: Sequence[np.ndarray]):
        self.objective, self.feeds = objective, feeds
        if objective.kind == "ppl" and not is_next_token_logits(feeds, float_outputs):
            raise QCompileError("--max-ppl-increase measures next-token perplexity: the model must take input_ids "
                                "and output logits [batch, seq, vocab]; use --min-cosine (encoders) or "
                                "--min-top1-agreement (classifiers)")
        self.reference = [self._summary(f, o) for f, o in zip(feeds, float_outputs)]

    def _summary(self, feed: dict, output: np.ndarray):
        kind = self.objective.kind
        if kind == "ppl":
            return mean_nll(output, feed)
        if kind == "top1":
            return output.argmax(axis=-1)
        return pooled(output, feed.get("attention_mask"))

    def terms(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        """The per-sample terms whose mean the loss is built on: ``ppl``, each sample's mean NLL
        minus the float model's; ``top1``, 1 at each arg-max that disagrees; ``cosine``,
        ``1 − cosine`` of each row."""
        got = [self._summary(f, o) for f, o in zip(self.feeds, outputs)]
        kind = self.objective.kind
        if kind == "ppl":
            return np.asarray(got, dtype=np.float64) - np.asarray(self.reference, dtype=np.float64)
        if kind == "top1":
            return np.concatenate([(a != b).ravel() for a, b in zip(self.reference, got)]).astype(np.float64)
        return 1.0 - np.concatenate([qm.cosine(a, b, axis=1) for a, b in zip(self.reference, got)])

    def loss(self, outputs: Sequence[np.ndarray], margin: float = 0.0) -> float:
        """The loss, estimated ``margin`` standard errors of the mean above the terms' mean
        ``t̄ + margin·σ_t/√n`` (σ: sample standard deviation; no margin from one term): ``ppl``
        ``exp(·) − 1`` of it (the perplexity increase), otherwise itself."""
        terms = self.terms(outputs)
        estimate = float(np.mean(terms))
        if margin and terms.size > 1:
            estimate += margin * float(np.std(terms, ddof=1)) / math.sqrt(terms.size)
        return math.expm1(estimate) if self.objective.kind == "ppl" else estimate


def mean_nll(logits: np.ndarray, feed: dict) -> float:
    """Mean next-token negative log-likelihood of ``input_ids`` under ``logits`` [B, S, V]
    (positions whose ``attention_mask`` is 0 left out)."""
    from qcompiler.evaluate import token_nll

    ids = feed["input_ids"]
    nll = token_nll(logits[:, :-1], ids[:, 1:])
    mask = feed.get("attention_mask")
    if mask is not None:
        return float(nll[mask[:, 1:].astype(bool)].mean())
    return float(nll.mean())


def pooled(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[B, S, H] → [B, H] mean over unmasked positions; other outputs → [B, -1]."""
    from qcompiler.evaluate import mean_pool

    if output.ndim == 3 and mask is not None and mask.shape == output.shape[:2]:
        return mean_pool(output, mask)
    return output.reshape(output.shape[0], -1).astype(np.float64)


@dataclasses.dataclass
class Decision:
    """What the search found. ``per_token``: layers whose activations are quantized per token
    at run time instead of with a static scale; ``kept_float``: layers left in float, in the
    order chosen. ``losses``: each evaluated choice (``"float k"``, ``"per-token k"``, ...) and
    its loss, in the order measured; ``final_loss``: the chosen one's."""

    objective: Objective
    layer_sqnr: dict[str, float]
    total_layers: int
    kept_float: list[str] = dataclasses.field(default_factory=list)
    per_token: list[str] = dataclasses.field(default_factory=list)
    ablation_gain: dict[str, float] = dataclasses.field(default_factory=dict)
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    final_loss: float = math.nan
    margin: float = 0.0

    def as_dict(self) -> dict:
        def layer(n: str) -> dict:
            return {"node": n, "layer_sqnr_db": self.layer_sqnr.get(n), "ablation_gain": self.ablation_gain.get(n)}

        return {
            "objective": dataclasses.asdict(self.objective),
            "kept_float": [layer(n) for n in self.kept_float],
            "per_token": [layer(n) for n in self.per_token],
            "loss_by_choice": self.losses,
            "final_loss": self.final_loss,
            "margin_standard_errors": self.margin,
            "quantized_layers": self.total_layers - len(self.kept_float),
            "total_layers": self.total_layers,
        }

    def summary(self) -> str:
        per_token = f"{len(self.per_token)} switched to per-token activations, " if self.per_token else ""
        return (f"{per_token}{len(self.kept_float)} of {self.total_layers} layers kept in float; "
                f"{self.objective.describe(self.final_loss)} on the held calibration samples"
                + (f" (mean + {self.margin:g} standard errors)" if self.margin else ""))


Loss = Callable[[frozenset[str], frozenset[str]], float]


def choose_precisions(
    layer_sqnr: dict[str, float],
    loss: Loss,
    objective: Objective,
    cap: int,
    candidates: int,
    per_token: Collection[str] = (),
    progress: Callable[[str], None] = lambda _: None,
    margin: float = 0.0,
) -> Decision:
    """The search of the module docstring. ``loss(F, P)`` measures the model with the layers
    ``F`` in float and ``P`` quantized per token; ``per_token``: the layers that can be."""
    ranked = sorted(layer_sqnr, key=lambda n: layer_sqnr[n])
    decision = Decision(objective, layer_sqnr, len(layer_sqnr), margin=margin)

    def measure(label: str, in_float: Sequence[str], tokens: Sequence[str]) -> float:
        if label not in decision.losses:
            progress(label)
            decision.losses[label] = loss(frozenset(in_float), frozenset(tokens) - frozenset(in_float))
        return decision.losses[label]

    decision.final_loss = measure("none", (), ())
    if decision.final_loss <= objective.limit:
        return decision
    rung = [n for n in ranked if n in set(per_token)]
    if rung:
        k = shortest_prefix(lambda k: measure(f"per-token {k}", (), rung[:k]) <= objective.limit, len(rung))
        if k is not None:
            decision.per_token, decision.final_loss = rung[:k], decision.losses[f"per-token {k}"]
            return decision
    _choose_float(decision, ranked, measure, rung, cap, candidates, progress)
    if rung:
        _trim_per_token(decision, measure, [n for n in rung if n not in set(decision.kept_float)])
    return decision


def _trim_per_token(decision: Decision, measure, rest: list[str]) -> None:
    """Step 4: with the float layers chosen, the shortest prefix of ``rest`` still per token."""
    in_float, limit = decision.kept_float, decision.objective.limit

    def label(k: int) -> str:
        return f"float {len(in_float)} + per-token {k}"

    k = 0 if measure(label(0), in_float, ()) <= limit else shortest_prefix(
        lambda k: measure(label(k), in_float, rest[:k]) <= limit, len(rest))
    if k is not None:  # None: not monotone after all; keep every layer per token
        decision.per_token, decision.final_loss = rest[:k], decision.losses[label(k)]
    else:
        decision.per_token = rest


def _choose_float(decision: Decision, ranked: list[str], measure, rung: list[str], cap: int, candidates: int,
                  progress: Callable[[str], None]) -> None:
    """Steps 2 and 3 with every layer of ``rung`` per token: ablation, then the shortest prefix."""
    objective = decision.objective
    rest = " + per-token rest" if rung else ""
    base = measure(f"float 0{rest}", (), rung)
    if cap < 1:
        raise QCompileError(f"{objective.describe(base)} with {_quantized(rung)}, and no layer may stay in float: "
                            "raise --max-float-fraction")
    pool = ranked[: max(candidates, cap)]
    for i, name in enumerate(pool):
        progress(f"ablation {i + 1}/{len(pool)}")
        decision.ablation_gain[name] = base - measure(f"float [{name}]{rest}", [name], rung)
    order = sorted(pool, key=lambda n: -decision.ablation_gain[n])
    last = min(cap, len(order))
    k = shortest_prefix(lambda k: measure(f"float {k}{rest}", order[:k], rung) <= objective.limit, last)
    if k is None:
        raise QCompileError(
            f"{objective.describe(decision.losses[f'float {last}{rest}'])} with the {last} most sensitive of "
            f"{decision.total_layers} layers in float (the cap) and {_quantized(rung)}; "
            f"{objective.describe(decision.losses['none'])} with none: raise --max-float-fraction, "
            "or quantize more gently (--w8a8: SmoothQuant, per-token activations)")
    decision.kept_float, decision.final_loss = order[:k], decision.losses[f"float {k}{rest}"]


def _quantized(rung: list[str]) -> str:
    return f"per-token activations in all {len(rung)} layers that take them" if rung else "every other layer quantized"


def shortest_prefix(meets: Callable[[int], bool], most: int) -> int | None:
    """The smallest ``k`` in ``1..most`` with ``meets(k)``, for ``meets`` monotone in ``k``:
    ``k`` = 1, 2, 4, … up to ``most``, then a bisection between the last failure and the first
    success (about ``2·log2(most)`` calls). None when ``meets(most)`` fails."""
    low, k = 0, 1
    while k < most and not meets(k):
        low, k = k, k * 2
    high = min(k, most)
    if high < 1 or not meets(high):
        return None
    while high - low > 1:
        mid = (low + high) // 2
        if meets(mid):
            high = mid
        else:
            low = mid
    return high
