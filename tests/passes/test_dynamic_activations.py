import numpy as np
import pytest
from onnx import numpy_helper

from passes.cleanup import CleanupPass
from passes.dynamic_activations import LowerDynamicActivationsPass
from passes.quantize_weights import QuantizeWeightsPass, quantize_weight
from passes.select_targets import SelectTargetsPass
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir

OPS = ("MatMul", "Gemm", "Conv")


def _lowered(proto, scheme):
    model = to_ir(proto)
    SelectTargetsPass(OPS)(model)
    QuantizeWeightsPass()(model)
    result = LowerDynamicActivationsPass(scheme)(model)
    CleanupPass()(model)
    return model, result


def per_token_reference(x, w):
    """Exact integer reference, asymmetric rows: int32 accumulation of x^q·W^q, rescale, then
    the row offset times the dequantized weight's column sums."""
    t = quantize_weight(w, 1)
    low = x.min(-1, keepdims=True)
    s_row = np.maximum(x.max(-1, keepdims=True) - low, np.float32(1e-8)) / np.float32(255)
    xq = np.clip(np.rint((x - low) / s_row), 0, 255).astype(np.int32)
    acc = xq @ t.q.astype(np.int32)
    return acc.astype(np.float32) * s_row * t.scale.reshape(-1) + low * t.dequantize().sum(0)


def per_token_sym_reference(x, w):
    """Exact integer reference: int32 accumulation of (x^q − 128)·W^q, then the two rescales."""
    t = quantize_weight(w, 1)
    s_row = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-8)) / np.float32(127)
    xq = np.clip(np.rint(x / s_row) + 128, 0, 255).astype(np.int32)
    acc = (xq - 128) @ t.q.astype(np.int32)
    return acc.astype(np.float32) * s_row * t.scale.reshape(-1)


def per_tensor_reference(x, w):
    """ONNX DynamicQuantizeLinear (uint8, range includes 0) then exact int32 accumulation."""
    t = quantize_weight(w, 1)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    xq = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.int32)
    acc = (xq - int(zero)) @ t.q.astype(np.int32)
    return acc.astype(np.float32) * scale * t.scale.reshape(-1)


REFERENCES = {"per-token": per_token_reference, "per-token-sym": per_token_sym_reference, "dynamic": per_tensor_reference}


@pytest.mark.parametrize("scheme", list(REFERENCES))
def test_matmul_lowering_matches_integer_reference(scheme):
    proto = graphs.mlp()
    model, result = _lowered(proto, scheme)
    assert result.modified
    check(model)
    ops = op_types(model)
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    ref = REFERENCES[scheme]
    h = np.maximum(ref(x, init["w1"]), 0)
    expected = ref(h, init["w2t"].T) + x
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans_b, alpha, beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_gemm_lowering_keeps_alpha_beta_and_bias(trans_b, alpha, beta):
    proto = graphs.gemm(trans_b=trans_b, alpha=alpha, beta=beta)
    model, _ = _lowered(proto, "per-token")
    check(model)
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    w = init["w"].T if trans_b else init["w"]
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    expected = alpha * per_token_reference(x, w) + beta * init["c"]
    got = run(model, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert model.graph.outputs[0].name == "y"  # the output keeps its name


def test_zero_rows_do_not_divide_by_zero():
    model, _ = _lowered(graphs.mlp(), "per-token")
    x = np.zeros((1, 3, 32), np.float32)
    assert np.all(np.isfinite(run(model, {"x": x})[0]))


def test_shared_activation_is_quantized_once_and_convs_are_left_alone():
    model, _ = _lowered(graphs.conv(), "per-token")
    assert "MatMulIntegerToFloat" not in op_types(model) and "Conv" in op_types(model)
    model, _ = _lowered(graphs.mlp(), "per-token")
    assert op_types(model).count("ReduceMin") == 2  # two distinct activations


def test_second_run_changes_nothing():
    model, _ = _lowered(graphs.mlp(), "per-token")
    assert not LowerDynamicActivationsPass("per-token")(model).modified
