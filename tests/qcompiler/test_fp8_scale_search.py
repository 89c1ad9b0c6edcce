"""FP8 scale searches against brute-force numpy + ml_dtypes references, and their use by the
passes (weights with a Hessian, activations with sampled rows)."""

import ml_dtypes
import numpy as np
import pytest

from passes.calibrate import STATS_KEY
from passes.quantize_fp8 import HESSIAN_KEY, InsertFP8QDQPass, QuantizeFP8WeightsPass
from passes.select_targets import SelectTargetsPass, targets
from passes.upgrade_opset import UpgradeOpsetPass
from qcompiler import fp8
from qcompiler.ranges import TensorStats
from tests import graphs
from tests.passes.helpers import to_ir

E4M3 = ml_dtypes.float8_e4m3fn


def _fake_quant(x, scale):
    scale = np.float32(scale)
    return np.clip(x / scale, -448, 448).astype(E4M3).astype(np.float32) * scale


def _reference_weight_scales(w, d, multipliers):
    """Channel by channel, multiplier by multiplier: the first m minimising Σ_i d_i (w_i − ŵ_i)²."""
    out = []
    for c in range(w.shape[1]):
        base = np.float32(np.abs(w[:, c]).max()) / np.float32(448)
        errors = [np.sum(d * (w[:, c] - _fake_quant(w[:, c], base * m)).astype(np.float64) ** 2) for m in multipliers]
        out.append(base * multipliers[int(np.argmin(errors))])
    return np.array(out, np.float32)


def _weights(seed, k=64, n=12):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, (k, n)).astype(np.float32) * rng.uniform(0.01, 1, n).astype(np.float32)
    d = rng.uniform(0.1, 1, k) * np.where(rng.random(k) < 0.05, 100.0, 1.0)  # a few heavy inputs
    return w, d


def test_weight_scale_search_equals_the_brute_force_reference():
    w, d = _weights(0)
    ours = fp8.search_weight_scale(w, d)
    np.testing.assert_allclose(ours, _reference_weight_scales(w, d, fp8.WEIGHT_MULTIPLIERS), rtol=1e-6)
    assert not np.allclose(ours, fp8.scale_for(np.abs(w).max(axis=0)))  # it does move some scales


def test_weight_scale_search_never_does_worse_than_amax_over_448():
    w, d = _weights(1, n=40)

    def error(s):
        dequantized = np.stack([_fake_quant(w[:, c], s[c]) for c in range(w.shape[1])], axis=1)
        return np.sum(d[:, None] * (w - dequantized).astype(np.float64) ** 2, axis=0)

    searched, plain = fp8.search_weight_scale(w, d), fp8.scale_for(np.abs(w).max(axis=0))
    assert np.all(error(searched) <= error(plain))
    tensor = fp8.search_weight_scale(w, d, per_channel=False)
    ratio = float(tensor) / float(fp8.scale_for(np.abs(w).max()))
    assert tensor.shape == () and np.isclose(ratio, fp8.WEIGHT_MULTIPLIERS, rtol=1e-6).any()


def test_activation_amax_search_equals_the_brute_force_reference():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(200, 32)) * np.where(np.arange(32) == 3, 30.0, 1.0)).astype(np.float32)
    w = rng.normal(size=(32, 20)).astype(np.float32)
    amax = float(np.abs(x).max())
    errors = [np.sum((_fake_quant(x, np.float32(amax * m) / np.float32(448)) @ w - x @ w) ** 2)
              for m in fp8.ACTIVATION_MULTIPLIERS]
    want = amax * fp8.ACTIVATION_MULTIPLIERS[int(np.argmin(errors))]
    assert fp8.search_activation_amax(x, w, amax) == pytest.approx(want, rel=1e-6)


def test_passes_use_the_searches_only_where_the_data_is_there():
    model = to_ir(graphs.mlp())
    UpgradeOpsetPass(19)(model)
    SelectTargetsPass(("MatMul",))(model)
    rng = np.random.default_rng(3)
    first, second = targets(model)
    x = rng.normal(0, 1.5, (300, first.weight.shape[0])).astype(np.float32)
    first.activation.meta[HESSIAN_KEY] = 2 / len(x) * x.T.astype(np.float64) @ x
    stats = TensorStats(channel_axis=-1, keep_rows=256)
    stats.update(x)
    first.activation.meta[STATS_KEY] = stats
    second.activation.meta[STATS_KEY] = TensorStats()  # no rows, no Hessian: plain amax
    second.activation.meta[STATS_KEY].update(np.array([[0.0], [7.0]], np.float32))
    assert QuantizeFP8WeightsPass(gptq=False, search_scales=True)(model).modified
    pass_ = InsertFP8QDQPass("minmax", search_scales=True)
    assert pass_(model).modified
    dq = first.node.inputs[1].producer()
    want = fp8.search_weight_scale(first.weight, np.diag(first.activation.meta[HESSIAN_KEY]))
    np.testing.assert_array_equal(dq.inputs[1].const_value.numpy(), want)
    amax = fp8.search_activation_amax(stats.rows.sample, first.weight, float(np.abs(x).max()))
    assert pass_.scales[first.activation.name] == pytest.approx(amax / 448, rel=1e-6)
    assert pass_.scales[second.activation.name] == pytest.approx(7.0 / 448, rel=1e-6)
    plain = second.node.inputs[1].producer().inputs[1].const_value.numpy()
    np.testing.assert_allclose(plain, fp8.scale_for(np.abs(second.weight).max(axis=0)), rtol=1e-7)
