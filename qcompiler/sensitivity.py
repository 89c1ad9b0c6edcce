"""Sensitivity-driven mixed precision: keep the fewest layers in float that meet an accuracy target.

The search, given ``loss(F)`` — the accuracy loss of the model with the layers ``F`` in float
(perplexity increase, ``1 − cosine`` or ``1 − top-1 agreement``, measured on calibration data):

1. **Rank** the quantized layers by their own error: the SQNR of each layer's output against the
   same layer in float, both fed the quantized model's activation (lowest first).
2. **Confirm** the ranking by ablation: for the ``candidates`` worst layers, the loss with that
   one layer in float; order them by how much loss that removes.
3. **Choose** the shortest prefix of that order whose loss meets the target: prefixes of 1, 2,
   4, … layers, then a bisection between the last that failed and the first that met it, never
   more than ``cap`` layers. When even ``cap`` layers do not meet the target, say so.

The graph plumbing (a model whose layers switch between float and quantized by a boolean input
each, so one ONNX Runtime session measures every choice) is ``passes.keep_sensitive_float``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

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


class Scorer:
    """Turns a model's outputs on the calibration samples into the objective's loss, against
    the float model's outputs given once."""

    def __init__(self, objective: Objective, feeds: Sequence[dict], float_outputs: Sequence[np.ndarray]):
        self.objective, self.feeds = objective, feeds
        if objective.kind == "ppl" and not all(
                "input_ids" in f and o.ndim == 3 and o.shape[-1] > int(np.max(f["input_ids"]))
                for f, o in zip(feeds, float_outputs)):
            raise QCompileError("--max-ppl-increase measures next-token perplexity: the model must take input_ids "
                                "and output logits [batch, seq, vocab]; use --min-cosine (encoders) or "
                                "--min-top1-agreement (classifiers)")
        self.reference = [self._summary(f, o) for f, o in zip(feeds, float_outputs)]
        if objective.kind == "ppl":
            self.float_nll = float(np.mean([r for r in self.reference]))

    def _summary(self, feed: dict, output: np.ndarray):
        kind = self.objective.kind
        if kind == "ppl":
            return mean_nll(output, feed)
        if kind == "top1":
            return output.argmax(axis=-1)
        return pooled(output, feed.get("attention_mask"))

    def loss(self, outputs: Sequence[np.ndarray]) -> float:
        got = [self._summary(f, o) for f, o in zip(self.feeds, outputs)]
        kind = self.objective.kind
        if kind == "ppl":
            return math.exp(float(np.mean(got)) - self.float_nll) - 1.0
        if kind == "top1":
            return 1.0 - float(np.mean(np.concatenate([(a == b).ravel() for a, b in zip(self.reference, got)])))
        cos = [qm.cosine(a, b, axis=1) for a, b in zip(self.reference, got)]
        return 1.0 - float(np.mean(np.concatenate(cos)))


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
    """What the search found. ``kept_float``: in the order chosen. ``losses``: the loss for
    each evaluated set size (0 = everything quantized)."""

    objective: Objective
    kept_float: list[str]
    layer_sqnr: dict[str, float]
    ablation_gain: dict[str, float]
    losses: dict[int, float]
    total_layers: int

    @property
    def final_loss(self) -> float:
        return self.losses[len(self.kept_float)]

    def as_dict(self) -> dict:
        return {
            "objective": dataclasses.asdict(self.objective),
            "kept_float": [{"node": n, "layer_sqnr_db": self.layer_sqnr.get(n), "ablation_gain": self.ablation_gain.get(n)}
                           for n in self.kept_float],
            "loss_by_count": {str(k): v for k, v in sorted(self.losses.items())},
            "quantized_layers": self.total_layers - len(self.kept_float),
            "total_layers": self.total_layers,
        }

    def summary(self) -> str:
        return (f"{len(self.kept_float)} of {self.total_layers} layers kept in float; "
                f"{self.objective.describe(self.final_loss)} on the calibration samples")


def choose_float_layers(
    layer_sqnr: dict[str, float],
    loss: Callable[[frozenset[str]], float],
    objective: Objective,
    cap: int,
    candidates: int,
    progress: Callable[[str], None] = lambda _: None,
) -> Decision:
    """The search of the module docstring. ``loss(F)`` measures the model with ``F`` in float."""
    ranked = sorted(layer_sqnr, key=lambda n: layer_sqnr[n])
    losses = {0: loss(frozenset())}
    decision = Decision(objective, [], layer_sqnr, {}, losses, len(layer_sqnr))
    if losses[0] <= objective.limit:
        return decision
    if cap < 1:
        raise QCompileError(f"{objective.describe(losses[0])} with every layer quantized, and no layer "
                            "may stay in float: raise --max-float-fraction")
    pool = ranked[: max(candidates, cap)]
    for i, name in enumerate(pool):
        progress(f"ablation {i + 1}/{len(pool)}")
        decision.ablation_gain[name] = losses[0] - loss(frozenset([name]))
    order = sorted(pool, key=lambda n: -decision.ablation_gain[n])

    def measure(k: int) -> float:
        if k not in losses:
            progress(f"{k} layers in float")
            losses[k] = loss(frozenset(order[:k]))
        return losses[k]

    low, high, k = 0, None, 1  # low: largest count known to fail
    while k <= min(cap, len(order)):
        if measure(k) <= objective.limit:
            high = k
            break
        low, k = k, k * 2
    if high is None:
        last = min(cap, len(order))
        if measure(last) <= objective.limit:
            high = last
        else:
            raise QCompileError(
                f"{objective.describe(losses[last])} with the {last} most sensitive of {len(layer_sqnr)} layers "
                f"in float (the cap); {objective.describe(losses[0])} with none: raise --max-float-fraction, "
                "or quantize more gently (SmoothQuant, per-token activations)")
    while high - low > 1:
        mid = (low + high) // 2
        if measure(mid) <= objective.limit:
            high = mid
        else:
            low = mid
    decision.kept_float = order[:high]
    return decision
