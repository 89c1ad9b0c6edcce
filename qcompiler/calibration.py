"""Calibration: run the float model in ONNX Runtime and stream activation statistics.

The model is saved once (external data, so any size works) with the observed activations added
as graph outputs; each calibration feed is run, every observed tensor is folded into its
``TensorStats`` and dropped, so memory does not grow with the number of samples.

Padding never reaches the statistics: when a feed has an ``attention_mask``, only the positions
where it is 1 are observed (tensors shaped ``[batch, seq, …]`` or ``[batch·seq, …]``). Padded
tokens' hidden states — and the -3.4e38 mask constants that follow them — would otherwise widen
the ranges of every layer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompiler import ir_utils
from qcompiler.errors import QCompileError, first_line
from qcompiler.ranges import TensorStats
from runtime.session import create_session

MASK_INPUT = "attention_mask"

Feed = Mapping[str, np.ndarray]
# A callable returning a fresh iterable of feeds each time it is called.
FeedSource = Callable[[], Iterable[Feed]]


def held_indices(n: int, held: int) -> list[int]:
    """``held`` of the sample indices ``0..n-1``, one in the middle of each of ``held`` equal
    strides: ``(2i + 1)·n // (2·held)``. Calibration sets are drawn in order (consecutive windows
    of a few articles): spread out, the held samples cover as many of them as the set does."""
    return [(2 * i + 1) * n // (2 * held) for i in range(held)]


def count_samples(feeds: FeedSource, limit: int | None = None) -> int:
    """How many samples ``feeds`` gives (at most ``limit``): one read of the source, no model run."""
    return sum(1 for _ in itertools.islice(feeds(), limit))


def split_feeds(feeds: FeedSource, held: int) -> tuple[FeedSource, FeedSource]:
    """``(held samples, the rest)``: ``held`` samples spread over ``feeds`` (``held_indices``)
    for a measurement kept apart from what is fitted on the rest. The samples are counted when
    either source is first read; the rest must not be empty."""

    @functools.cache
    def chosen() -> frozenset[int]:
        n = count_samples(feeds)
        if n <= held:
            raise QCompileError(f"the accuracy target is measured on {held} calibration samples held apart "
                                f"(--sensitivity-samples); pass more calibration samples than that (got {n})")
        return frozenset(held_indices(n, held))

    def pick(keep: bool) -> FeedSource:
        def source() -> Iterator[Feed]:
            marks = chosen()
            return (f for i, f in enumerate(feeds()) if (i in marks) == keep)

        return source

    return pick(True), pick(False)


def collect_stats(model: ir.Model, values: list[ir.Value], feeds: Iterable[Feed], **options) -> dict[str, TensorStats]:
    """Statistics of ``values`` (by name) over the float model's run on ``feeds``; ``options``
    as ``collect_fold_stats``'s (one fold)."""
    return collect_fold_stats(model, values, feeds, **options)[0]


def collect_fold_stats(
    model: ir.Model,
    values: list[ir.Value],
    feeds: Iterable[Feed],
    *,
    folds: int = 1,
    fold_of: Callable[[int], int] = lambda i: 0,
    channel_axes: Mapping[str, int] | None = None,
    mask_padding: bool = True,
    max_samples: int | None = None,
    progress: bool = True,
    keep_rows: int = 0,
    histogram: bool = True,
    heavy_rows: int = 0,
) -> list[dict[str, TensorStats]]:
    """Statistics of ``values`` (by name) over the float model's run on ``feeds``, kept apart by
    fold: sample ``i`` is observed by fold ``fold_of(i)`` of ``folds`` (cross-validation: a
    range taken on one fold, an error measured on another's rows). ``channel_axes`` gives a
    value's channel axis (default: the last); ``keep_rows``: also sample that many rows of each
    (``TensorStats.rows``), with the ``heavy_rows`` of largest magnitude besides
    (``RowSample.weighted``); ``histogram=False``: no histograms (no range method but min-max
    can be applied)."""
    axes = channel_axes or {}
    by_fold = [{v.name: TensorStats(channel_axis=axes.get(v.name, -1), keep_rows=keep_rows, histogram=histogram,
                                    heavy_rows=heavy_rows) for v in values} for _ in range(folds)]
    samples = 0
    seen = {v.name: 0 for v in values}  # elements observed (finite or not)
    with observing(model, values) as run:
        for feed in tqdm(feeds, desc="calibrating", unit="sample", disable=not progress):
            outputs = run(feed)
            mask = feed.get(MASK_INPUT) if mask_padding else None
            stats = by_fold[fold_of(samples)]
            for name in stats:
                x = valid_positions(outputs[name], mask)
                stats[name].update(x)
                seen[name] += x.size
            samples += 1
            if max_samples is not None and samples >= max_samples:
                break
    if samples == 0:
        raise QCompileError("the calibration data holds no samples")
    for name in seen:  # an empty tensor (a zero-length cache) is not an error
        if seen[name] and not any(s[name].count and (s[name].rows is None or s[name].rows.seen) for s in by_fold):
            raise QCompileError(
                f"activation {name!r} is not finite on any calibration sample (NaN, or "
                "overflow to Inf): check the calibration data's values and scale"
            )
    return by_fold


@contextlib.contextmanager
def observing(model: ir.Model, values: list[ir.Value]) -> Iterator[Callable[[Feed], dict[str, np.ndarray]]]:
    """A session over the float model that returns ``values``: yields ``run(feed)`` →
    {name: array}. The model is saved once to a temporary folder (external data, any size) with
    the values made graph outputs; a graph input among ``values`` is read from the feed."""
    inputs = {v.name for v in model.graph.inputs}
    observed = [v for v in values if v.name not in inputs]
    names = [v.name for v in observed]
    with tempfile.TemporaryDirectory(prefix="qcompile-calib-") as tmp:
        path = Path(tmp) / "calibration.onnx"
        with ir_utils.extra_outputs(model, observed):
            ir.save(model, path, external_data="calibration.onnx.data")
        session = create_session(path)

        def run(feed: Feed) -> dict[str, np.ndarray]:
            outputs = _run(session, names, feed)
            return {v.name: outputs[v.name] if v.name in outputs else feed[v.name] for v in values}

        yield run


def run_once(model: ir.Model, values: list[ir.Value], feed: Feed) -> dict[str, np.ndarray]:
    """The float model's ``values`` on one feed (a one-off session, any model size)."""
    with observing(model, values) as run:
        return run(feed)


def _run(session, names: list[str], feed: Feed) -> dict[str, np.ndarray]:
    try:
        return dict(zip(names, session.run(names, dict(feed))))
    except Exception as exc:
        raise QCompileError(f"the model failed on a calibration sample: {first_line(exc)}") from exc


def valid_positions(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The entries of ``x`` at unmasked token positions (all of ``x`` when no mask fits)."""
    if mask is None or x.ndim < 2:
        return x
    keep = np.asarray(mask) != 0
    if x.shape[: keep.ndim] == keep.shape:
        return x[keep]
    if x.shape[0] == keep.size:
        return x[keep.reshape(-1)]
    return x
