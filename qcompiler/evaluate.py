"""Evaluation harness: how much accuracy a compiled model lost, how much smaller and faster it is.

Tasks (each compares the quantized model against the float one on held-apart data):

* ``embedding``: mean-pooled sentence embeddings (attention-masked mean of
  ``last_hidden_state``); mean/min cosine between float and quantized embeddings, unpadded
  (one sentence per run) and in padded batches of 32; nearest-neighbour agreement (for each
  sentence, is its nearest other sentence the same under both models).
* ``lm``: perplexity ``exp(mean NLL)`` of next-token prediction over 512-token windows, and
  the ratio quantized / float.
* ``image``: top-1 agreement between the two models on photos and crops, and top-1 accuracy on
  the labelled photos.

Latency: ONNX Runtime CPU provider, ``threads`` intra-op threads, the two models run
interleaved (float, quantized, float, …) on the same input so that machine noise hits both;
the median of each is reported.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from qcompiler import quant_math as qm
from qcompiler.calibration import Feed
from qcompiler.errors import QCompileError, first_line
from runtime.session import create_session

TASKS = ("embedding", "lm", "image")
# What ONNX Runtime raises when a feed does not fit the model (not RuntimeError subclasses).
_ORT_RUN_ERRORS = (_ort_state.Fail, _ort_state.InvalidArgument, _ort_state.RuntimeException)


@dataclasses.dataclass
class Evaluation:
    task: str
    metrics: dict[str, float | int]
    float_bytes: int
    quant_bytes: int
    latency_ms: dict[str, dict[str, float]]  # shape label -> {"float": ms, "quant": ms}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(name, value) rows for a text table."""
        rows = [(k, _fmt(v)) for k, v in self.metrics.items()]
        rows.append(("size float → quant (MB)", f"{self.float_bytes / 1e6:.1f} → {self.quant_bytes / 1e6:.1f} ({self.float_bytes / max(self.quant_bytes, 1):.2f}× smaller)"))
        for label, ms in self.latency_ms.items():
            rows.append(
                (f"latency {label} float → quant (ms)", f"{ms['float']:.2f} → {ms['quant']:.2f} ({ms['float'] / ms['quant']:.2f}× faster)")
            )
        return rows


def _fmt(v: float | int) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.5f}" if abs(v) < 10 else f"{v:.3f}"


# --- task metrics ----------------------------------------------------------------------------


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-masked mean over the sequence: ``Σ_t m_t h_t / Σ_t m_t``."""
    m = mask.astype(np.float64)[..., None]
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def embeddings(session, feeds: Iterable[Feed]) -> np.ndarray:
    output = session.get_outputs()[0].name
    pooled = [mean_pool(session.run([output], dict(f))[0], f["attention_mask"]) for f in feeds]
    return np.concatenate(pooled, axis=0)


def embedding_metrics(
    float_session, quant_session, unpadded: Sequence[Feed], padded: Sequence[Feed]
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for label, feeds in (("unpadded", unpadded), ("padded batch", padded)):
        if not feeds:
            continue
        ref, got = embeddings(float_session, feeds), embeddings(quant_session, feeds)
        cos = qm.cosine(ref, got)
        metrics[f"mean cosine ({label})"] = float(cos.mean())
        metrics[f"min cosine ({label})"] = float(cos.min())
        if label == "unpadded":
            metrics["nearest-neighbour agreement"] = nearest_neighbour_agreement(ref, got)
            metrics["sentences"] = len(ref)
    return metrics


def nearest_neighbour_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Fraction of rows whose nearest other row (cosine) is the same in both sets."""

    def neighbours(e: np.ndarray) -> np.ndarray:
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return float(np.mean(neighbours(ref) == neighbours(got)))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``−log softmax(logits)[target]`` at each position (float64): ``logits`` [..., V],
    ``targets`` [...] (integer ids)."""
    logits = np.asarray(logits, np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    return log_z - np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]


def perplexity(session, windows: Iterable[Feed]) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all windows."""
    output = session.get_outputs()[0].name
    total_nll, total_tokens = 0.0, 0
    for feed in windows:
        logits = session.run([output], dict(feed))[0]
        ids = feed["input_ids"]
        total_nll += float(token_nll(logits[:, :-1], ids[:, 1:]).sum())
        total_tokens += ids[:, 1:].size
    return math.exp(total_nll / max(total_tokens, 1))


def lm_metrics(float_session, quant_session, windows: Sequence[Feed]) -> dict[str, float]:
    ppl_float, ppl_quant = perplexity(float_session, windows), perplexity(quant_session, windows)
    return {
        "perplexity float": ppl_float,
        "perplexity quant": ppl_quant,
        "perplexity ratio": ppl_quant / ppl_float,
        "windows": len(windows),
    }


def top1(session, feeds: Iterable[Feed]) -> np.ndarray:
    output = session.get_outputs()[0].name
    return np.concatenate([session.run([output], dict(f))[0].argmax(axis=-1) for f in feeds])


def image_metrics(
    float_session,
    quant_session,
    feeds: Sequence[Feed],
    labelled: Sequence[tuple[Feed, set[int]]] = (),
) -> dict[str, float]:
    ref, got = top1(float_session, feeds), top1(quant_session, feeds)
    metrics = {"top-1 agreement": float(np.mean(ref == got)), "images": len(ref)}
    if labelled:
        for label, session in (("float", float_session), ("quant", quant_session)):
            hits = [int(top1(session, [f])[0]) in ok for f, ok in labelled]
            metrics[f"top-1 accuracy {label} (labelled photos)"] = float(np.mean(hits))
    return metrics


# --- latency ---------------------------------------------------------------------------------


def interleaved_times(
    sessions: dict[str, object], feed: Feed, runs: int = 20, warmup: int = 3
) -> dict[str, list[float]]:
    """Milliseconds of every run of each session, runs interleaved across sessions (so that a
    slow spell of a shared machine falls on all of them alike)."""
    feed = dict(feed)
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_latency(
    sessions: dict[str, object], feed: Feed, runs: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median milliseconds per run of each session, runs interleaved across sessions."""
    times = interleaved_times(sessions, feed, runs, warmup)
    return {name: statistics.median(t) for name, t in times.items()}


# --- entry point -----------------------------------------------------------------------------


@dataclasses.dataclass
class EvalData:
    """What a task is evaluated on (see ``qcompiler.eval_data`` for the defaults)."""

    feeds: list[Feed]
    padded: list[Feed] = dataclasses.field(default_factory=list)
    labelled: list[tuple[Feed, set[int]]] = dataclasses.field(default_factory=list)
    latency_feeds: dict[str, Feed] = dataclasses.field(default_factory=dict)


def evaluate(
    float_path: str | Path,
    quant_path: str | Path,
    task: str,
    data: EvalData,
    threads: int = 2,
    latency_runs: int = 20,
) -> Evaluation:
    """Accuracy of ``quant_path`` against ``float_path`` on ``data``, sizes and latency."""
    from qcompiler.pipeline import model_file_bytes

    if task not in TASKS:
        raise QCompileError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    float_path, quant_path = Path(float_path), Path(quant_path)
    for path in (float_path, quant_path):
        if not path.is_file():
            raise QCompileError(f"model file not found: {path}")
    sessions = {
        "float": create_session(float_path, threads=threads),
        "quant": create_session(quant_path, threads=threads),
    }
    try:
        if task == "embedding":
            metrics = embedding_metrics(sessions["float"], sessions["quant"], data.feeds, data.padded)
        elif task == "lm":
            metrics = lm_metrics(sessions["float"], sessions["quant"], data.feeds)
        else:
            metrics = image_metrics(sessions["float"], sessions["quant"], data.feeds, data.labelled)
        latency = {
            label: interleaved_latency(sessions, feed, runs=latency_runs)
            for label, feed in data.latency_feeds.items()
        }
    except (RuntimeError, KeyError, ValueError, IndexError, *_ORT_RUN_ERRORS) as exc:
        raise QCompileError(
            f"cannot evaluate these models as task {task!r} on this data ({first_line(exc)})"
        ) from exc
    return Evaluation(
        task, metrics, model_file_bytes(float_path), model_file_bytes(quant_path), latency
    )
