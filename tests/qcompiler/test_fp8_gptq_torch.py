"""GPTQ on the E4M3 grid (torch, lazy blocks) against an independent numpy reference: the same
E4M3 values bit for bit, and torch's float8 cast against ml_dtypes (ties to even, saturation)."""

import ml_dtypes
import numpy as np
import pytest
import torch

from qcompiler import fp8

E4M3 = ml_dtypes.float8_e4m3fn


def _reference_gptq(w, hessian, scale, damp=0.01):
    """Textbook GPTQ, one row at a time with no lazy blocks: ``q_i = E4M3(w_i/s)``, then every
    later row ``j`` absorbs ``[H_F⁻¹]_ji / [H_F⁻¹]_ii · (w_i − s q_i)`` with ``H_F⁻¹`` the inverse
    of the still-free rows' Hessian, updated by one Gaussian elimination step (numpy float64)."""
    w = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(len(h))] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    q = np.empty(w.shape, E4M3)
    for i in range(len(w)):
        q[i] = np.clip((w[i] / scale).astype(np.float32), -448, 448).astype(E4M3)
        delta = w[i] - q[i].astype(np.float64) * scale
        w[i + 1:] -= np.outer(hinv[i + 1:, i] / hinv[i, i], delta)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]  # drop row i from the free set
    return q


def _problem(k, n, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    x = rng.normal(size=(4 * k, k)) @ (rng.normal(size=(k, k)) + 3 * np.eye(k))  # correlated inputs
    return w, 2 / len(x) * x.T @ x


@pytest.mark.parametrize("per_channel", [True, False])
def test_gptq_fp8_equals_the_row_by_row_reference(per_channel):
    w, h = _problem(96, 40, 0)
    h[5, :] = h[:, 5] = 0.0  # an input that never fires: its row is zeroed
    scale = fp8.scale_for(np.abs(w).max(axis=0) if per_channel else np.abs(w).max())
    ours = fp8.gptq_quantize(w, h, scale, block=32)  # three lazy blocks
    np.testing.assert_array_equal(ours.view(np.uint8), _reference_gptq(w, h, scale).view(np.uint8))
    assert float(ours[5].astype(np.float32).max()) == 0.0


def test_gptq_fp8_act_order_equals_the_reference_on_permuted_rows():
    w, h = _problem(64, 24, 1)
    scale = fp8.scale_for(np.abs(w).max(axis=0))
    order = np.argsort(-np.diag(h), kind="stable")
    want = np.empty((64, 24), E4M3)
    want[order] = _reference_gptq(w[order], h[np.ix_(order, order)], scale)
    np.testing.assert_array_equal(fp8.gptq_quantize(w, h, scale, act_order=True).view(np.uint8), want.view(np.uint8))


def test_torch_float8_cast_rounds_half_to_even_and_saturates_like_ml_dtypes():
    grid = np.sort(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    ties = (grid[1:] + grid[:-1]) / 2  # exact midpoints in float32
    x = np.concatenate([ties, np.random.default_rng(2).normal(0, 60, 10000), [1e9, -1e9, 470.0]]).astype(np.float32)
    ours = torch.from_numpy(x).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(ours, fp8.to_fp8(x).view(np.uint8))
