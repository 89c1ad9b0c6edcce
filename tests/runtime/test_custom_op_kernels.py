"""qcompile's custom ops (runtime/csrc) on ONNX Runtime's CPU provider against numpy references.

Int4MatMul: numpy dequantizes exactly (s · (u − z) with the op's fp16 parameters widened to
float32), multiplies in float64; the op must agree to float32 rounding. MixedInt8MatMul: an
independent numpy LLM.int8() (row scales, half-to-even rounding, int64 accumulation, fp16
outlier weights); float32 activations agree to float32 rounding, float16 ones to fp16's.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import QCompileError
from runtime import custom_ops
from runtime.session import create_session

DOMAIN = "qcompile"


def model_bytes(op: str, inputs: dict, feed_name: str, feed_type: int, k: int, **attrs) -> bytes:
    """One ``op`` node reading graph input ``feed_name`` and the initializers ``inputs``."""
    node = helper.make_node(op, [feed_name, *inputs], ["y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(feed_name, feed_type, [None, None, k])],
        [helper.make_tensor_value_info("y", feed_type, None)],
        [numpy_helper.from_array(v, name) for name, v in inputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=10)
    return model.SerializeToString()


def packed_int4(rng, k: int, n: int, g: int):
    """Random codes, packed ``[N, ceil(K/g), g/2]`` (low nibble first), fp16 scales/zero points."""
    blocks = -(-k // g)
    u = rng.integers(0, 16, (k, n)).astype(np.uint8)
    padded = np.zeros((blocks * g, n), np.uint8)
    padded[:k] = u
    pairs = padded.T.reshape(n, blocks, g // 2, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    s = rng.uniform(0.002, 0.05, (n, blocks)).astype(np.float16)
    z = rng.uniform(0.0, 15.0, (n, blocks)).astype(np.float16)
    return u, b, s, z


def int4_reference(x: np.ndarray, u, s, z, g: int) -> np.ndarray:
    group = np.arange(u.shape[0]) // g
    w = s.astype(np.float32)[:, group].T * (u.astype(np.float32) - z.astype(np.float32)[:, group].T)
    return x.astype(np.float64) @ w.astype(np.float64)


INT4_SHAPES = [  # (lead dims of A, K, N, group)
    ((1, 1), 64, 16, 32),      # decode: M = 1
    ((1, 1), 100, 7, 32),      # K not a multiple of the group, odd N
    ((2, 3), 96, 33, 64),      # ragged last group, N not a multiple of the 16-column tile
    ((1, 9), 300, 19, 128),
    ((1, 5), 48, 1, 16),       # a single output column
    ((2, 17), 576, 70, 576),   # per-channel (one group), M = 34
]


@pytest.mark.parametrize("lead, k, n, g", INT4_SHAPES)
def test_int4_matmul_float32_matches_exact_dequantization(lead, k, n, g):
    rng = np.random.default_rng(k * 1000 + n)
    u, b, s, z = packed_int4(rng, k, n, g)
    session = create_session(model_bytes("Int4MatMul", {"b": b, "s": s, "z": z}, "a", TensorProto.FLOAT, k,
                                         K=k, N=n, group_size=g), threads=2)
    x = rng.normal(size=(*lead, k)).astype(np.float32)
    y = session.run(None, {"a": x})[0]
    expected = int4_reference(x, u, s, z, g)
    assert y.shape == (*lead, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_int4_matmul_float16_activations_round_to_float16():
    rng = np.random.default_rng(7)
    k, n, g = 200, 37, 32
    u, b, s, z = packed_int4(rng, k, n, g)
    session = create_session(model_bytes("Int4MatMul", {"b": b, "s": s, "z": z}, "a", TensorProto.FLOAT16, k,
                                         K=k, N=n, group_size=g))
    x = rng.normal(size=(1, 3, k)).astype(np.float16)
    y = session.run(None, {"a": x})[0]
    expected = int4_reference(x, u, s, z, g)
    assert y.dtype == np.float16
    # float32 accumulation, one rounding to fp16 at the end: half an fp16 ulp of each output
    np.testing.assert_allclose(y.astype(np.float64), expected, rtol=2**-11, atol=1e-6)
    assert np.abs(y - expected).max() > 0  # it is fp16: not the float32 result


def test_int4_matmul_rejects_a_weight_of_the_wrong_shape():
    rng = np.random.default_rng(0)
    _, b, s, z = packed_int4(rng, 64, 8, 32)
    session = create_session(model_bytes("Int4MatMul", {"b": b, "s": s, "z": z}, "a", TensorProto.FLOAT, 64,
                                         K=64, N=8, group_size=16))  # B is packed for groups of 32
    with pytest.raises(Exception, match="B must be uint8"):
        session.run(None, {"a": np.zeros((1, 1, 64), np.float32)})


def mixed_reference(x: np.ndarray, wq: np.ndarray, w_scale: np.ndarray, index: np.ndarray,
                    w_outlier: np.ndarray) -> np.ndarray:
    """LLM.int8() written out independently: wq is [N, K]."""
    x = x.astype(np.float32)
    rest = x.copy()
    rest[..., index] = 0
    s = np.maximum(np.abs(rest).max(axis=-1, keepdims=True), np.float32(1e-8)) / np.float32(127)
    q = np.clip(np.rint(rest / s), -127, 127).astype(np.int64)
    acc = q @ wq.T.astype(np.int64)
    y = acc.astype(np.float64) * s.astype(np.float64) * w_scale.astype(np.float64)
    return y + x[..., index].astype(np.float64) @ w_outlier.astype(np.float64)


def mixed_inputs(rng, k: int, n: int, outliers: int):
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    index = np.sort(rng.choice(k, outliers, replace=False)).astype(np.int64)
    w_outlier = rng.normal(0, 0.1, (outliers, n)).astype(np.float16)
    return {"wq": wq, "ws": w_scale, "idx": index, "wo": w_outlier}


def outlier_activations(rng, lead, k, index):
    x = rng.normal(size=(*lead, k)).astype(np.float32)
    x[..., index] *= 60.0  # the outlier channels dwarf the rest
    return x


MIXED_SHAPES = [((1, 1), 64, 16, 2), ((1, 1), 129, 7, 3), ((2, 5), 96, 33, 0), ((1, 70), 300, 65, 6),
                ((3, 1), 1536, 9, 30)]


@pytest.mark.parametrize("lead, k, n, outliers", MIXED_SHAPES)
def test_mixed_int8_matmul_float32_matches_llm_int8_reference(lead, k, n, outliers):
    rng = np.random.default_rng(k + n + outliers)
    inputs = mixed_inputs(rng, k, n, outliers)
    session = create_session(model_bytes("MixedInt8MatMul", inputs, "x", TensorProto.FLOAT, k), threads=2)
    x = outlier_activations(rng, lead, k, inputs["idx"])
    y = session.run(None, {"x": x})[0]
    expected = mixed_reference(x, *inputs.values())
    assert y.shape == (*lead, n)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_mixed_int8_matmul_float16_activations_round_to_float16():
    rng = np.random.default_rng(3)
    k, n = 256, 31
    inputs = mixed_inputs(rng, k, n, 4)
    session = create_session(model_bytes("MixedInt8MatMul", inputs, "x", TensorProto.FLOAT16, k))
    x = outlier_activations(rng, (2, 3), k, inputs["idx"]).astype(np.float16)
    y = session.run(None, {"x": x})[0]
    assert y.dtype == np.float16
    expected = mixed_reference(x, *inputs.values())
    np.testing.assert_allclose(y.astype(np.float64), expected, rtol=2**-10, atol=1e-3 * np.abs(expected).max())


def test_outliers_skip_the_row_scale():
    """One huge outlier channel must not coarsen the int8 step of the other channels."""
    rng = np.random.default_rng(5)
    k, n = 128, 8
    inputs = mixed_inputs(rng, k, n, 1)
    x = rng.normal(size=(1, 4, k)).astype(np.float32)
    x[..., inputs["idx"]] = 3000.0
    y = create_session(model_bytes("MixedInt8MatMul", inputs, "x", TensorProto.FLOAT, k)).run(None, {"x": x})[0]
    rest = x.astype(np.float64)
    rest[..., inputs["idx"]] = 0
    w = (inputs["wq"].T * inputs["ws"]).astype(np.float64)  # the weight the int8 part stands for
    exact = rest @ w + x[..., inputs["idx"]] @ inputs["wo"].astype(np.float64)
    assert np.abs(y - exact).max() / np.abs(exact).max() < 0.02  # int8 rows of N(0, 1): ~1% error


def test_a_model_in_the_qcompile_domain_without_the_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(custom_ops.ENV, str(tmp_path / "missing.so"))
    rng = np.random.default_rng(0)
    data = model_bytes("MixedInt8MatMul", mixed_inputs(rng, 16, 4, 1), "x", TensorProto.FLOAT, 16)
    with pytest.raises(QCompileError, match="make runtime"):
        create_session(data)


def test_imports_domain_reads_only_the_opset_imports(tmp_path):
    rng = np.random.default_rng(0)
    data = model_bytes("MixedInt8MatMul", mixed_inputs(rng, 16, 4, 1), "x", TensorProto.FLOAT, 16)
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert custom_ops.imports_domain(path) and custom_ops.imports_domain(data)
    plain = onnx.ModelProto.FromString(data)
    del plain.opset_import[1]
    assert not custom_ops.imports_domain(plain.SerializeToString())
