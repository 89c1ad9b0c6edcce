"""How much error each layer carries: run two models on the same feeds and compare values.

For a reference ``x`` and a value under test ``x̂`` (summed over every element of every feed)::

    SQNR   = 10·log10(Σ x² / Σ (x − x̂)²)   dB  (= 20·log10(‖x‖/‖x − x̂‖))
    cosine = Σ x·x̂ / sqrt(Σ x² · Σ x̂²)
    max |x − x̂|

The values compared are those both graphs produce under the same name (``qcompiler.diff``
finds, for every quantized layer, the first such value at or after its output). The error is
the error *at* that point, accumulated through every layer before it, as a user running the
model sees it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import QCompileError
from runtime.session import create_session

Feed = dict[str, np.ndarray]
_INLINE_LIMIT = 1_800_000_000  # bytes: above this a model goes to the session as a file


@dataclasses.dataclass
class ErrorStats:
    """Running sums for SQNR, cosine and max error between a reference and a test value."""

    ref_sq: float = 0.0
    err_sq: float = 0.0
    dot: float = 0.0
    test_sq: float = 0.0
    max_abs: float = 0.0
    elements: int = 0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        ref, test = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
        err = ref - test
        self.ref_sq += float(ref @ ref)
        self.err_sq += float(err @ err)
        self.dot += float(ref @ test)
        self.test_sq += float(test @ test)
        self.max_abs = max(self.max_abs, float(np.abs(err).max(initial=0.0)))
        self.elements += ref.size

    @property
    def sqnr_db(self) -> float:
        if self.err_sq == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.ref_sq, 1e-300) / self.err_sq)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.ref_sq * self.test_sq)
        return self.dot / denom if denom > 0 else (1.0 if self.err_sq == 0 else 0.0)

    def as_dict(self) -> dict:
        return {"sqnr_db": self.sqnr_db, "cosine": self.cosine, "max_abs": self.max_abs, "elements": self.elements}


def session_with_outputs(model: str | Path | onnx.ModelProto, names: list[str], threads: int | None = None,
                         workdir: str | Path | None = None):
    """An ONNX Runtime session over ``model`` that also returns the values ``names``."""
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    have = {o.name for o in proto.graph.output}
    extra = [onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have]
    proto.graph.output.extend(extra)
    try:
        if proto.ByteSize() < _INLINE_LIMIT:
            return create_session(proto.SerializeToString(), threads=threads)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(proto, str(path), save_as_external_data=True, location="model.onnx.data")
            return create_session(path, threads=threads)
    finally:
        for value in extra:
            proto.graph.output.remove(value)


SAMPLE_VALUES = 4096  # values of each sampled activation kept per feed


def compare(model_a, model_b, points: list[str], feeds: Iterable[Feed], threads: int | None = None,
            pairs: dict[str, tuple[str, str]] | None = None, samples: dict[str, list] | None = None,
            ) -> tuple[dict[str, ErrorStats], dict[str, ErrorStats]]:
    """Error of B against A at each value in ``points`` and at every graph output of A; and,
    for ``pairs`` (key → (test, reference) values both in B), the error between two values of B.
    ``samples`` (name → list, filled in the same run): up to ``SAMPLE_VALUES`` evenly strided
    values per feed of each named value of A (for histograms)."""
    pairs, samples = pairs or {}, samples if samples is not None else {}
    in_b = [n for pair in pairs.values() for n in pair]
    a = session_with_outputs(model_a, [*points, *samples], threads)
    b = session_with_outputs(model_b, [*points, *in_b], threads)
    sampled_only = set(samples) - set(points)  # (an activation entering a layer is no graph output)
    outputs = [o.name for o in a.get_outputs() if o.name not in sampled_only]
    names = list(dict.fromkeys([*points, *outputs]))
    a_names = list(dict.fromkeys([*names, *samples]))
    stats = {n: ErrorStats() for n in names}
    local = {k: ErrorStats() for k in pairs}
    b_names = list(dict.fromkeys([*names, *in_b]))
    count = 0
    for feed in feeds:
        ref = dict(zip(a_names, a.run(a_names, dict(feed))))
        for n, kept in samples.items():
            flat = np.asarray(ref[n], np.float32).ravel()
            kept.append(flat[:: max(1, flat.size // SAMPLE_VALUES)])
        got = dict(zip(b_names, b.run(b_names, dict(feed))))
        for n in names:
            _update(stats[n], ref[n], got[n])
        for key, (test, reference) in pairs.items():
            _update(local[key], got[reference], got[test])
        count += 1
    if count == 0:
        raise QCompileError("the data has no samples: give a .npz file or a folder of them with at least one")
    return ({n: s for n, s in stats.items() if s.elements}, {k: s for k, s in local.items() if s.elements})


def _update(stats: ErrorStats, ref, test) -> None:
    if ref is None or test is None or ref.shape != test.shape or not np.issubdtype(ref.dtype, np.floating):
        return
    stats.update(ref, test)
