"""Token-by-token perplexity through a tiny one-head decoder, against numpy's causal attention
over the whole window (float cache) and over an int8-quantized cache."""

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from passes.quantize_kv_cache import QuantizeKVCachePass
from qcompiler.decode_eval import decode_perplexity
from qcompiler.errors import QCompileError
from tests import graphs

VOCAB, DIM = 11, 4
RNG = np.random.default_rng(7)
EMBED = RNG.normal(0, 1, (VOCAB, DIM)).astype(np.float32)
WK, WV = (RNG.normal(0, 1, (DIM, DIM)).astype(np.float32) for _ in range(2))
WO = RNG.normal(0, 2, (DIM, VOCAB)).astype(np.float32)


def _tiny_lm(path):
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "wk"], ["k2"]),
        helper.make_node("MatMul", ["h", "wv"], ["v2"]),
        helper.make_node("Unsqueeze", ["k2", "one"], ["k"]),
        helper.make_node("Unsqueeze", ["v2", "one"], ["v"]),
        helper.make_node("Unsqueeze", ["h", "one"], ["q"]),
        helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "v"], ["present.0.value"], axis=2),
        helper.make_node("Transpose", ["present.0.key"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "present.0.value"], ["attended"]),
        helper.make_node("Squeeze", ["attended", "one"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["logits"]),
    ]
    cache = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, "P", DIM])  # noqa: E731
    model = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "T"]),
         cache("past_key_values.0.key"), cache("past_key_values.0.value")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", VOCAB]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, 1, "T", DIM]),
         helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, [1, 1, "T", DIM])],
        {"embed": EMBED, "wk": WK, "wv": WV, "wo": WO, "one": np.array([1], np.int64)},
        opset=19,
    )
    ir.save(ir.from_proto(model), path)
    return path


def _int8(x):
    scale = (np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float16).astype(np.float32)
    return np.clip(np.round(x / scale), -127, 127) * scale


def _reference_perplexity(ids, cache=lambda x: x):
    """Causal attention over the window in numpy (the cache seen through ``cache``)."""
    h = EMBED[ids]
    k, v = cache(h @ WK), cache(h @ WV)
    nll = 0.0
    for t in range(len(ids) - 1):
        s = h[t] @ k[: t + 1].T
        p = np.exp(s - s.max())
        logits = (p / p.sum()) @ v[: t + 1] @ WO
        logits = logits.astype(np.float64)
        nll += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[ids[t + 1]]
    return nll, len(ids) - 1


def test_token_by_token_perplexity_equals_numpy_for_float_and_int8_caches(tmp_path):
    path = _tiny_lm(tmp_path / "lm.onnx")
    windows = [RNG.integers(0, VOCAB, (1, n)) for n in (9, 6)]
    got = decode_perplexity(path, windows)
    parts = [_reference_perplexity(w[0]) for w in windows]
    assert got.tokens == 13 and got.windows == 2 and got.cache_bytes_per_token == 2 * DIM * 4
    assert got.perplexity == pytest.approx(math.exp(sum(p[0] for p in parts) / 13), rel=1e-5)

    model = ir.load(path)
    QuantizeKVCachePass("int8")(model)
    quant = tmp_path / "lm.kv-int8.onnx"
    ir.save(model, quant)
    got_q = decode_perplexity(quant, windows)
    parts_q = [_reference_perplexity(w[0], _int8) for w in windows]
    assert got_q.cache_bytes_per_token == 2 * (DIM + 2)
    assert got_q.perplexity == pytest.approx(math.exp(sum(p[0] for p in parts_q) / 13), rel=1e-5)
    assert got_q.perplexity != pytest.approx(got.perplexity, rel=1e-7)  # the cache really is quantized


def test_a_graph_without_cache_is_refused(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(ir.from_proto(graphs.mlp()), path)
    with pytest.raises(QCompileError, match="past_key_values"):
        decode_perplexity(path, [np.zeros((1, 3), np.int64)])
