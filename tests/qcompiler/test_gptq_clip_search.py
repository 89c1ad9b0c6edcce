"""GPTQ's clipping search (``gptq.clipped_group_params``, ``clip_ratios``) against a brute-force
numpy reference written here: every ratio, every column, the H-weighted error by a plain loop."""

import numpy as np
import pytest

from qcompiler import gptq
from qcompiler import quant_math as qm
from qcompiler.quant_math import WeightFormat

FORMATS = [
    pytest.param(WeightFormat(4, 16, symmetric=False), id="uint4-g16"),
    pytest.param(WeightFormat(4, 16, symmetric=True), id="int4-g16"),
    pytest.param(WeightFormat(3, 16, symmetric=False), id="uint3-g16"),
]


def _group(seed: int, g: int = 16, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed weights (where clipping pays) and a random SPD ``H = XᵀX``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df=3, size=(g, n)).astype(np.float32)
    x = rng.normal(size=(4 * g, g)) * rng.uniform(0.1, 3.0, size=g)
    return w, (x.T @ x / len(x)).astype(np.float32)


def _reference(w, h, fmt: WeightFormat, ratios):
    """Per column: ``argmin_r (w − Q_r(w))ᵀ H (w − Q_r(w))``, written out in float64."""
    qmin, qmax = fmt.qtype.qmin, fmt.qtype.qmax
    scales, zeros, errors = [], [], []
    for c in range(w.shape[1]):
        col = w[:, c].astype(np.float64)
        best = None
        for r in ratios:
            lo, hi = min(col.min() * r, 0.0), max(col.max() * r, 0.0)
            if fmt.symmetric:
                s, z = max(max(abs(lo), abs(hi)) / qmax, 1e-12), 0.0
            else:
                s = max((hi - lo) / (qmax - qmin), 1e-12)
                z = float(np.clip(qmin - np.rint(lo / s), qmin, qmax))
            d = col - s * (np.clip(np.rint(col / s) + z, qmin, qmax) - z)
            e = d @ h.astype(np.float64) @ d
            if best is None or e < best[2] * (1 - 1e-6):  # strictly better: the first ratio wins ties
                best = (s, z, e)
        scales.append(best[0]), zeros.append(best[1]), errors.append(best[2])
    return np.array(scales), np.array(zeros), np.array(errors)


def _errors(w, h, scale, zero, fmt):
    d = (w - qm.dequantize(qm.quantize(w, scale, zero, fmt.qtype), scale, zero)).astype(np.float64)
    return np.einsum("in,in->n", d, h.astype(np.float64) @ d)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_search_matches_the_reference_and_never_loses_to_min_max(fmt, seed):
    w, h = _group(seed)
    scale, zero = gptq.clipped_group_params(w, h, fmt)
    ref_scale, ref_zero, ref_err = _reference(w, h, fmt, gptq.CLIP_RATIOS)
    got = _errors(w, h, scale, zero, fmt)
    np.testing.assert_allclose(got, ref_err, rtol=1e-4)
    np.testing.assert_allclose(scale[0], ref_scale, rtol=1e-5)
    np.testing.assert_array_equal(zero[0], ref_zero)
    min_max = _errors(w, h, *qm.range_params(w.min(0, keepdims=True), w.max(0, keepdims=True),
                                              fmt.qtype, fmt.symmetric), fmt)
    assert np.all(got <= min_max * (1 + 1e-6))
    assert np.sum(got) < np.sum(min_max)  # heavy tails: clipping helps somewhere


def test_one_ratio_is_min_max_exactly():
    w, h = _group(3)
    fmt = WeightFormat(4, 16)
    scale, zero = gptq.clipped_group_params(w, h, fmt, ratios=(1.0,))
    rtn = fmt.quantize(w)
    np.testing.assert_array_equal(scale, rtn.scale)
    np.testing.assert_array_equal(zero, rtn.zero_point)


def test_unweighted_search_is_plain_weight_mse():
    w, _ = _group(4)
    fmt = WeightFormat(4, 16)
    scale, zero = gptq.clipped_group_params(w, None, fmt)
    _, _, ref_err = _reference(w, np.eye(16), fmt, gptq.CLIP_RATIOS)
    np.testing.assert_allclose(_errors(w, np.eye(16, dtype=np.float32), scale, zero, fmt), ref_err, rtol=1e-4)


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_without_clip_ratios_is_unchanged_and_act_order_groups_are_searched(act_order):
    rng = np.random.default_rng(5)
    w = rng.standard_t(df=3, size=(64, 24)).astype(np.float32)
    x = rng.normal(size=(256, 64)) * rng.uniform(0.1, 3.0, size=64)
    h = 2 * x.T @ x / len(x)
    fmt = WeightFormat(4, 16)
    plain = gptq.gptq_quantize(w, h, fmt, act_order=act_order)
    same = gptq.gptq_quantize(w, h, fmt, act_order=act_order, clip_ratios=(1.0,))
    np.testing.assert_array_equal(plain.quantized.q, same.quantized.q)
    searched = gptq.gptq_quantize(w, h, fmt, act_order=act_order, clip_ratios=gptq.CLIP_RATIOS)
    if act_order:  # static groups: the search on the original weights with H's diagonal blocks
        expected = np.concatenate([gptq.clipped_group_params(w[b:b + 16], h[b:b + 16, b:b + 16], fmt)[0]
                                   for b in range(0, 64, 16)])
        np.testing.assert_array_equal(searched.quantized.scale, expected)
    assert not np.array_equal(searched.quantized.scale, plain.quantized.scale)
    delta = (w - searched.quantized.dequantize()).astype(np.float64)
    assert np.isclose(0.5 * np.einsum("kn,kn->", delta, h @ delta), searched.loss, rtol=0.05)
