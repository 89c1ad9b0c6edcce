"""KV-cache quantization on a tiny one-layer decoder: structure, numbers against numpy step by
step (the quantized cache fed back), idempotence and the refusal on a graph without a cache."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from passes.quantize_kv_cache import QuantizeKVCachePass, cache_bytes_per_token, cache_entries
from qcompiler.errors import QCompileError
from qcompiler.pipeline import run_passes
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir

HEADS, DIM = 2, 8


def _decoder():
    """x [B, H, S, D] → k = 1.5·x, v = x + 0.5 appended to the cache; attention of x over the
    cache: softmax(x·presentᵀ)·present_v."""
    shape = lambda length: ["B", HEADS, length, DIM]  # noqa: E731
    nodes = [
        helper.make_node("Mul", ["x", "k_gain"], ["k_new"]),
        helper.make_node("Add", ["x", "v_shift"], ["v_new"]),
        helper.make_node("Concat", ["past_key_values.0.key", "k_new"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "v_new"], ["present.0.value"], axis=-2),
        helper.make_node("Transpose", ["present.0.key"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["x", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "present.0.value"], ["out"]),
        # The exporter's past length (ONNX Runtime has no Shape kernel for float8 inputs).
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_len"], start=2, end=3),
        helper.make_node("Shape", ["past_key_values.0.value"], ["past_shape"]),
    ]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape("S")),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, shape("P")),
         helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, shape("P"))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape("S")),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, shape("T")),
         helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, shape("T")),
         helper.make_tensor_value_info("past_len", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("past_shape", TensorProto.INT64, [4])],
        {"k_gain": np.array(1.5, np.float32), "v_shift": np.array(0.5, np.float32)},
        opset=19,
    )


def _reference_quantize(x, dtype):
    """Independent numpy: float16 scale per (b, h, t) vector, then int8 RNE or E4M3."""
    qmax = 127.0 if dtype == "int8" else 448.0
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(qmax), np.float32(1e-6))
    scale16 = scale.astype(np.float16)
    ratio = x / scale16.astype(np.float32)
    if dtype == "int8":
        q = np.clip(np.round(ratio), -127, 127).astype(np.int8)
    else:
        q = np.clip(ratio, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, scale16


def _dequantize(q, scale16):
    return q.astype(np.float32) * scale16.astype(np.float32)


def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_cache_is_stored_in_8_bits_and_matches_numpy_step_by_step(dtype):
    model = to_ir(_decoder())
    result = QuantizeKVCachePass(dtype)(model)
    assert result.modified
    check(model)
    storage = ir.DataType.INT8 if dtype == "int8" else ir.DataType.FLOAT8E4M3FN
    inputs = {v.name: v.dtype for v in model.graph.inputs}
    outputs = {v.name: v.dtype for v in model.graph.outputs}
    assert inputs["past_key_values.0.key"] == storage and inputs["past_key_values.0.key_scale"] == ir.DataType.FLOAT16
    assert outputs["present.0.value"] == storage and outputs["present.0.value_scale"] == ir.DataType.FLOAT16
    assert "Concat" in op_types(model) and model.metadata_props["qcompile.kv_cache"] == dtype
    # 2·H·(D + 2) bytes per token against 2·H·2D in float16.
    assert cache_bytes_per_token(model.graph) == 2 * HEADS * (DIM + 2)

    rng = np.random.default_rng(0)
    np_dtype = np.int8 if dtype == "int8" else ml_dtypes.float8_e4m3fn
    feed_past = {f"past_key_values.0.{kind}": np.zeros((1, HEADS, 0, DIM), np_dtype) for kind in ("key", "value")}
    feed_past |= {f"past_key_values.0.{kind}_scale": np.zeros((1, HEADS, 0, 1), np.float16) for kind in ("key", "value")}
    ref_cache = {"key": [], "value": []}
    names = [v.name for v in model.graph.outputs]
    for step, length in enumerate((3, 1, 1, 1)):  # a prefill of 3, then three decode steps
        x = (rng.normal(0, 2.0, (1, HEADS, length, DIM)) * (1 + 10 * (step == 2))).astype(np.float32)
        got = dict(zip(names, run(model, {"x": x, **{n: _ort(v) for n, v in feed_past.items()}})))
        past = sum(c[0].shape[2] for c in ref_cache["key"])
        assert got.pop("past_len").tolist() == [past] and got.pop("past_shape").tolist() == [1, HEADS, past, DIM]
        for kind, new in (("key", 1.5 * x), ("value", x + np.float32(0.5))):
            q, s16 = _reference_quantize(new.astype(np.float32), dtype)
            ref_cache[kind].append((q, s16))
            want_q = np.concatenate([c[0] for c in ref_cache[kind]], axis=2)
            want_s = np.concatenate([c[1] for c in ref_cache[kind]], axis=2)
            np.testing.assert_array_equal(got[f"present.0.{kind}"].view(np.uint8), want_q.view(np.uint8))
            np.testing.assert_array_equal(got[f"present.0.{kind}_scale"], want_s)
        keys = np.concatenate([_dequantize(*c) for c in ref_cache["key"]], axis=2)
        values = np.concatenate([_dequantize(*c) for c in ref_cache["value"]], axis=2)
        want = _softmax(x @ keys.transpose(0, 1, 3, 2)) @ values
        np.testing.assert_allclose(got["out"], want, rtol=1e-5, atol=1e-5)
        feed_past = {n.replace("present", "past_key_values"): v for n, v in got.items() if n.startswith("present")}
        if dtype == "fp8":  # ONNX Runtime hands float8 back as its bits (uint8)
            feed_past = {n: v if n.endswith("_scale") else v.view(np_dtype) for n, v in feed_past.items()}


def _ort(array):
    """Float8 arrays go to ONNX Runtime as OrtValues of its float8 type."""
    if array.dtype == ml_dtypes.float8_e4m3fn:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint8), TensorProto.FLOAT8E4M3FN)
    return array


def test_running_twice_changes_nothing_and_a_graph_without_cache_is_refused():
    model = to_ir(_decoder())
    assert QuantizeKVCachePass("int8")(model).modified
    assert not QuantizeKVCachePass("int8")(model).modified
    assert cache_entries(model.graph) == []
    with pytest.raises(QCompileError, match="already int8"):
        run_passes(model, [QuantizeKVCachePass("fp8")])
    with pytest.raises(QCompileError, match="past key/values"):
        run_passes(to_ir(graphs.mlp()), [QuantizeKVCachePass("int8")])
