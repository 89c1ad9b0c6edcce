"""``--method auto`` for weight-only recipes with calibration data: compile each candidate
method, keep the one that loses least on calibration samples held apart from fitting.

The calibration samples are split: ``held_count(n) = max(1, n // 4)`` of them, spread evenly
over the set (``calibration.held_indices``), are held apart, the others fit every candidate
(GPTQ's Hessians, AWQ's scales and clipping). Each candidate (``CANDIDATES``: GPTQ with
act-order and the clipping search, with and without AWQ's scales before it) is compiled in full
into a temporary folder beside the output and run on the held samples; its loss is

* a language model (``input_ids`` in, logits ``[B, S, V]`` out): the perplexity increase
  ``exp(mean NLL_q − mean NLL_float) − 1`` over the held windows;
* any other model: ``1 − mean cosine`` of its first output to the float model's (mean-pooled
  over unmasked tokens for ``[B, S, H]`` outputs)

(``sensitivity.Scorer``). The lowest loss wins (ties: the earlier candidate) and is compiled
once more on *all* the calibration samples (the held ones chose the method; they need not be
lost to fitting: SmolLM2's GPTQ overfits 16 windows less than 12); that model is the output,
with the choice and every candidate's loss in the metadata (``qcompile.weight_only_auto``) and
in the compile's report. The evaluation data of ``qcompile
eval`` is never seen. With a single calibration sample nothing can be held apart: it fits and
scores (the report says so).

Cost: one compile per candidate, one run of each on the held samples, and the winner's compile
again (SmolLM2-135M on 2 cores: see ``bench/results/weight_only.md``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from qcompiler import sensitivity
from qcompiler.calibration import Feed, FeedSource, split_feeds
from qcompiler.config import WeightOnlyConfig
from runtime.session import create_session

# (label, WeightOnlyConfig fields): the methods compared, in tie-break order.
CANDIDATES: tuple[tuple[str, dict], ...] = (
    # SmolLM2-135M W4 g128, perplexity ratio on 16 eval windows (bench/results/weight_only.md):
    # AWQ ×1.189; GPTQ act-order ×1.214, + clip search ×1.200, + damp 0.1 ×1.165, 0.25 ×1.149
    # (16 windows, 8k tokens, overfit K = 1536 inputs at 0.01); AWQ scales + that GPTQ (damp
    # 0.1) ×1.127. Two candidates keep the search within a 10 min compile on 2 cores.
    ("awq-gptq act-order clip", dict(method="awq-gptq", act_order=True, clip_search=True, damp=0.1)),
    ("gptq act-order clip", dict(method="gptq", act_order=True, clip_search=True, damp=0.25)),
)
METADATA_KEY = "qcompile.weight_only_auto"


def held_count(n: int) -> int:
    """Samples held apart out of ``n``: a quarter, at least one (0 when ``n < 2``: none spare)."""
    return 0 if n < 2 else max(1, n // 4)


def fit_and_held(feeds: Sequence[Feed]) -> tuple[list[Feed], list[Feed]]:
    """``(fit, held)``: ``held_count`` samples spread over ``feeds`` (``calibration.split_feeds``)
    held; with one sample, both are it."""
    feeds = list(feeds)
    if held_count(len(feeds)) == 0:
        return feeds, feeds
    held, fit = split_feeds(lambda: iter(feeds), held_count(len(feeds)))
    return list(fit()), list(held())


def objective_for(feeds: Sequence[Feed], outputs: Sequence[np.ndarray]) -> sensitivity.Objective:
    """``ppl`` when the first output is next-token logits of ``input_ids``, else ``cosine``."""
    if sensitivity.is_next_token_logits(feeds, outputs):
        return sensitivity.Objective("ppl", 0.0)
    return sensitivity.Objective("cosine", 1.0)


def first_outputs(model_path: Path, feeds: Sequence[Feed]) -> list[np.ndarray]:
    """The model's first output on every feed (ONNX Runtime CPU)."""
    session = create_session(model_path)
    name = session.get_outputs()[0].name
    inputs = {i.name for i in session.get_inputs()}
    return [session.run([name], {k: v for k, v in f.items() if k in inputs})[0] for f in feeds]


def held_scorer(model_path: Path, held: Sequence[Feed]) -> sensitivity.Scorer:
    """A scorer of candidate outputs on ``held`` against the float model's."""
    outputs = first_outputs(model_path, held)
    return sensitivity.Scorer(objective_for(held, outputs), held, outputs)


@dataclasses.dataclass(frozen=True)
class Choice:
    """Every candidate's held-out loss (``losses``, by label) and the winner."""

    chosen: str
    losses: dict[str, float]
    objective: str
    fit_samples: int
    held_samples: int

    def describe(self) -> str:
        unit = "perplexity +{:.2%}" if self.objective == "ppl" else "1 − cosine {:.2e}"
        scores = ", ".join(f"{k} {unit.format(v)}" for k, v in self.losses.items())
        held = (f"{self.held_samples} held calibration samples" if self.fit_samples and self.held_samples
                else "the one calibration sample (nothing to hold apart)")
        return f"auto chose {self.chosen}: {scores} on {held}"


def choose(losses: dict[str, float]) -> str:
    """The label of the smallest loss; the first of equal ones."""
    return min(losses, key=lambda k: (losses[k], list(losses).index(k)))


def compile_auto(
    model_path: Path,
    output_path: Path,
    config: WeightOnlyConfig,
    feeds: FeedSource,
    digest: str | None,
    compile_fn: Callable,
    **compile_kwargs,
):
    """Compile every candidate on the fitting samples, score each on the held ones, move the
    winner to ``output_path``. ``compile_fn``: ``pipeline.compile_model``. Returns its
    ``CompileResult`` (reports: the winner's plus the choice; seconds: the whole search)."""
    from qcompiler.pipeline import PassReport

    start = time.perf_counter()
    all_feeds = list(itertools.islice(feeds(), config.calibration.max_samples))
    fit, held = fit_and_held(all_feeds)
    scorer = held_scorer(model_path, held)
    losses, results = {}, {}
    with tempfile.TemporaryDirectory(prefix=".qcompile-auto-", dir=output_path.parent) as tmp:
        for i, (label, fields) in enumerate(CANDIDATES):
            path = Path(tmp) / str(i) / output_path.name
            path.parent.mkdir()
            candidate = dataclasses.replace(config, **fields)
            results[label] = compile_fn(model_path, path, candidate, feeds=lambda: iter(fit), **compile_kwargs)
            losses[label] = scorer.loss(first_outputs(path, held))
        chosen = choose(losses)
        choice = Choice(chosen, losses, scorer.objective.kind, len(fit) if held is not fit else 0, len(held))
        result = results[chosen]
        if held is not fit:  # refit the chosen method on every sample
            path = Path(tmp) / "final" / output_path.name
            path.parent.mkdir()
            candidate = dataclasses.replace(config, **dict(CANDIDATES)[chosen])
            result = compile_fn(model_path, path, candidate, feeds=lambda: iter(all_feeds), **compile_kwargs)
        _stamp(result.output, choice, digest)
        for file in sorted(result.output.parent.iterdir(), reverse=True):  # the .data before the model
            os.replace(file, output_path.parent / file.name)
    report = PassReport(name="WeightOnlyAutoChoice", modified=False, added={}, removed={},
                        seconds=time.perf_counter() - start, note=choice.describe())
    return dataclasses.replace(result, output=output_path, reports=[*result.reports, report],
                               seconds=time.perf_counter() - start)


def _stamp(path: Path, choice: Choice, digest: str | None) -> None:
    """Add the choice (and the calibration digest) to the model's metadata; weights untouched."""
    proto = onnx.load(path, load_external_data=False)
    props = {p.key: p for p in proto.metadata_props}
    entries = {METADATA_KEY: json.dumps(dataclasses.asdict(choice), sort_keys=True)}
    if digest:
        entries["qcompile.calibration_digest"] = digest
    for key, value in entries.items():
        entry = props.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)
