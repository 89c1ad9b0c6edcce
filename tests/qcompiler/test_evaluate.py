import math

import numpy as np
import pytest

from qcompiler import evaluate


class _FixedSession:
    """A stand-in for an InferenceSession that returns given outputs in order."""

    class _Output:
        name = "out"

    def __init__(self, outputs):
        self._outputs = list(outputs)
        self.calls = 0

    def get_outputs(self):
        return [self._Output()]

    def run(self, names, feed):
        self.calls += 1
        return [self._outputs[(self.calls - 1) % len(self._outputs)]]


def test_perplexity_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    windows = [{"input_ids": rng.integers(0, 50, (1, 12))} for _ in range(3)]
    logits = [rng.normal(0, 3, (1, 12, 50)).astype(np.float32) for _ in range(3)]
    got = evaluate.perplexity(_FixedSession(logits), windows)
    nll = torch.cat([
        torch.nn.functional.cross_entropy(torch.from_numpy(l[0, :-1]), torch.from_numpy(w["input_ids"][0, 1:]), reduction="none")
        for l, w in zip(logits, windows)
    ])
    assert got == pytest.approx(math.exp(nll.double().mean().item()), rel=1e-6)


def test_mean_pool_ignores_padding():
    hidden = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(evaluate.mean_pool(hidden, mask), [hidden[0, :2].mean(0), hidden[1, 0]])


def test_nearest_neighbour_agreement():
    e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert evaluate.nearest_neighbour_agreement(e, e) == 1.0
    swapped = e[[0, 2, 1, 3]]  # rows 1 and 2 trade places: neighbours change for every row
    assert evaluate.nearest_neighbour_agreement(e, swapped) == 0.0


def test_image_metrics_count_agreement_and_labels():
    ref = [np.array([[0.1, 0.9, 0.0]]), np.array([[0.8, 0.1, 0.1]])]
    got = [np.array([[0.1, 0.9, 0.0]]), np.array([[0.1, 0.8, 0.1]])]
    feeds = [{"image": np.zeros(1)}] * 2
    m = evaluate.image_metrics(_FixedSession(ref), _FixedSession(got), feeds, labelled=[(feeds[0], {1})])
    assert m["top-1 agreement"] == 0.5 and m["images"] == 2
    assert m["top-1 accuracy float (labelled photos)"] == 1.0


def test_interleaved_latency_runs_every_session_the_same_number_of_times():
    sessions = {"a": _FixedSession([np.zeros(1)]), "b": _FixedSession([np.zeros(1)])}
    ms = evaluate.interleaved_latency(sessions, {"x": np.zeros(1)}, runs=5, warmup=2)
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    assert sessions["a"].calls == sessions["b"].calls == 7
