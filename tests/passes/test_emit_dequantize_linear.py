import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from passes.emit_dequantize_linear import EMITTED_KEY, EmitDequantizeLinearPass
from qcompiler.packed_weight import WEIGHT_KEY, PackedWeight
from qcompiler.quant_math import WeightFormat
from tests import graphs
from tests.passes.helpers import check, op_types, run

# Shared with test_emit_matmulnbits.py: graphs, PackedWeight builders, the reference and tolerance.

LEAD = (2, 5)  # x: [2, 5, K]


def matmul_model(k: int, n: int, seed: int = 0):
    """x[2, 5, K] → MatMul(W) → y, with W: [K, N] an initializer ``w``."""
    w = np.random.default_rng(seed).normal(0, 0.2, (k, n)).astype(np.float32)
    proto = graphs.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*LEAD, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*LEAD, n])],
        {"w": w},
    )
    return proto, w


def affine(w: np.ndarray, bits: int, group: int | None, symmetric: bool) -> PackedWeight:
    return PackedWeight.from_quantized(WeightFormat(bits, group, symmetric).quantize(w), bits, "rtn")


def offset(k: int, n: int, bits: int, group: int | None, seed: int = 1) -> PackedWeight:
    """``W = s · q + m`` per block (a GGUF Q4_1-like grid), built by hand."""
    rng, g = np.random.default_rng(seed), group or k
    blocks = -(-k // g)
    q = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    scale = rng.uniform(0.005, 0.05, (blocks, n)).astype(np.float32)
    minimum = rng.normal(0, 0.2, (blocks, n)).astype(np.float32)
    return PackedWeight(bits, g, q, "grid", scale=scale, offset=minimum)


def codebook(k: int, n: int, bits: int, per_channel: bool, seed: int = 2) -> PackedWeight:
    rng = np.random.default_rng(seed)
    table = np.sort(rng.normal(0, 0.2, (n if per_channel else 1, 1 << bits)), axis=1).astype(np.float32)
    q = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    return PackedWeight(bits, k, q, "kmeans", codebook=table)


def inputs(k: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(*LEAD, k)).astype(np.float32)


def reference(x: np.ndarray, packed: PackedWeight) -> np.ndarray:
    """numpy ``x @ W`` in float64, ``W`` the packed weight's own dequantization."""
    return x.astype(np.float64) @ packed.dequantize().astype(np.float64)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """1e-5 relative, absolute floor 1e-5·max|y|: float32 sums of K products (measured ≤ 1e-6)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def emitted(pass_, packed: PackedWeight, proto=None, node: str = "proj") -> ir.Model:
    """The model with ``packed`` on MatMul ``node``, after ``pass_`` (which must change it)."""
    model = ir.from_proto(proto if proto is not None else matmul_model(*packed.shape)[0])
    model.graph.node(node).meta[WEIGHT_KEY] = packed
    assert pass_(model).modified
    check(model)
    return model


def _initializer_type(model: ir.Model, suffix: str) -> ir.DataType | None:
    found = [v.const_value.dtype for n, v in model.graph.initializers.items() if n.endswith(suffix)]
    return found[0] if found else None


def _evaluate(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return ReferenceEvaluator(ir.to_proto(model)).run(None, {"x": x})[0]


AFFINE = [
    (k, bits, g, sym)
    for k in (64, 96, 576)
    for g in (32, 64, 128, None)
    if g is None or k % g == 0
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
] + [(96, 4, 64, False)]  # ragged: the last group has 32 rows


@pytest.mark.parametrize("k, bits, group, symmetric", AFFINE)
def test_affine_is_one_dequantize_linear_equal_to_numpy_and_reference(k, bits, group, symmetric):
    _, w = matmul_model(k, 6)
    packed = affine(w, bits, group, symmetric)
    model = emitted(EmitDequantizeLinearPass(), packed)
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    assert "w" not in model.graph.initializers  # the float weight is gone
    assert model.opset_imports[""] == 21 and model.ir_version >= 10
    dq = model.graph.node(0)
    if group is None or group >= k:
        assert dq.attributes.get_int("axis") == 1 and "block_size" not in dq.attributes
    else:
        assert (dq.attributes.get_int("axis"), dq.attributes.get_int("block_size")) == (0, group)
    four = bits <= 4
    q_type = {(True, True): ir.DataType.INT4, (True, False): ir.DataType.UINT4,
              (False, True): ir.DataType.INT8, (False, False): ir.DataType.UINT8}[four, symmetric]
    assert _initializer_type(model, "weight_q") == q_type
    assert _initializer_type(model, "weight_zero") == (None if symmetric else q_type)
    _assert_matches_reference(model, packed, k)


def _assert_matches_reference(model, packed, k: int) -> None:
    """ORT and ONNX's reference evaluator both give numpy's ``x @ W``; a second run changes nothing."""
    x = inputs(k)
    expected = reference(x, packed)
    assert_close(run(model, {"x": x})[0], expected)
    assert_close(_evaluate(model, x), expected)
    assert model.graph.outputs[0].name == "y"
    assert not EmitDequantizeLinearPass()(model).modified


OFFSET = [(64, 4, 32), (96, 4, 32), (576, 4, 32), (576, 4, 64), (576, 4, None), (64, 2, 32),
          (96, 3, 32), (64, 8, 32), (96, 4, 64)]  # the last one ragged: x is zero-padded


@pytest.mark.parametrize("k, bits, group", OFFSET)
def test_offset_adds_block_sums_times_minimum_exactly(k, bits, group):
    packed = offset(k, 5, bits, group)
    model = emitted(EmitDequantizeLinearPass(), packed)
    types = op_types(model)
    assert types.count("MatMul") == 2 and "ReduceSum" in types and types[-1] == "Add"
    assert ("Pad" in types) == (group is not None and k % group != 0)
    assert "w" not in model.graph.initializers
    _assert_matches_reference(model, packed, k)


def test_offset_with_an_input_of_unknown_rank_reshapes_through_its_shape():
    packed = offset(64, 4, 4, 32)
    model = ir.from_proto(matmul_model(64, 4)[0])
    model.graph.inputs[0].shape = None
    model.graph.node("proj").meta[WEIGHT_KEY] = packed
    assert EmitDequantizeLinearPass()(model).modified
    assert {"Shape", "Concat"} <= set(op_types(model))
    x = inputs(64)
    assert_close(run(model, {"x": x})[0], reference(x, packed))


CODEBOOK = [(k, bits, per_channel) for k in (64, 576) for bits in (2, 3, 4, 8) for per_channel in (0, 1)]


@pytest.mark.parametrize("k, bits, per_channel", CODEBOOK)
def test_codebook_is_looked_up_before_the_matmul(k, bits, per_channel):
    packed = codebook(k, 6, bits, per_channel)
    model = emitted(EmitDequantizeLinearPass(), packed)
    assert op_types(model) == ["Cast", *(["Add"] if per_channel else []), "Gather", "MatMul"]
    # ONNX Runtime 1.31 CPU casts UINT4 to INT32: 2–4-bit indices stay 4-bit on disk
    index_type = ir.DataType.UINT4 if bits <= 4 else ir.DataType.UINT8
    assert _initializer_type(model, "weight_index") == index_type
    x = inputs(k)
    expected = reference(x, packed)
    assert_close(run(model, {"x": x})[0], expected)
    assert_close(_evaluate(model, x), expected)
    assert not EmitDequantizeLinearPass()(model).modified


def _optimized_run(model: ir.Model, x: np.ndarray, accuracy_level: str | None) -> np.ndarray:
    options = ort.SessionOptions()  # default level: ORT_ENABLE_ALL
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    proto = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_ort_fuses_the_blocked_dequantize_linear_into_matmulnbits_at_int8_accuracy_by_default():
    _, w = matmul_model(576, 8)
    packed = affine(w, 4, 32, symmetric=False)
    model = emitted(EmitDequantizeLinearPass(), packed)
    x = inputs(576)
    expected = reference(x, packed)
    # session.qdq_matmulnbits_accuracy_level=0: the fused kernel computes in float32
    assert_close(_optimized_run(model, x, "0"), expected)
    # its default (4) quantizes x to int8 per block inside the kernel: measured 4.7e-3 relative
    error = np.abs(_optimized_run(model, x, None) - expected).max() / np.abs(expected).max()
    assert 1e-4 < error < 2e-2


def saved_bytes(model: ir.Model, path) -> int:
    ir.save(model, path)
    return path.stat().st_size


def test_a_4_bit_g128_weight_takes_under_0_3x_of_float32_on_disk(tmp_path):
    k, n = 1024, 256
    _, w = matmul_model(k, n)
    model = emitted(EmitDequantizeLinearPass(), affine(w, 4, 128, symmetric=False))
    size = saved_bytes(model, tmp_path / "w4.onnx")
    assert size <= 0.3 * w.nbytes, size / w.nbytes  # measured: 0.13 (q 1/8, scales and zeros 1/128)


def tied_model(vocab: int = 96, dim: int = 64, seed: int = 0):
    """ids → Gather(E) → h → MatMul(Transpose(E)) → logits: an LM head tied to the embedding."""
    table = np.random.default_rng(seed).normal(0, 0.2, (vocab, dim)).astype(np.float32)
    proto = graphs.make_model(
        [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
         helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tie"),
         helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", vocab])],
        {"table": table},
    )
    return proto, table


def check_tied(pass_) -> ir.Model:
    """The LM head is emitted; the Transpose goes; the Gather keeps reading the float table."""
    proto, table = tied_model()
    packed = affine(np.ascontiguousarray(table.T), 4, 32, symmetric=True)
    model = emitted(pass_, packed, proto, node="lm_head")
    assert "table" in model.graph.initializers and "Transpose" not in op_types(model)
    assert model.graph.node("embed").inputs[0] is model.graph.initializers["table"]
    ids = np.array([[0, 7, 95, 7]], np.int64)
    assert_close(run(model, {"ids": ids})[0], reference(table[ids], packed))
    assert not pass_(model).modified
    return model


def test_a_tied_lm_head_keeps_the_float_table_for_the_embedding_gather():
    check_tied(EmitDequantizeLinearPass())


def test_refusals_say_why_and_change_nothing():
    _, w = matmul_model(64, 4)
    both_inputs = graphs.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*LEAD, 64]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*LEAD, 4])],
        {},
    )
    cases = [(both_inputs, affine(w, 4, 32, True), "not a constant"),
             (matmul_model(64, 4)[0], affine(w[:32], 4, 32, True), "does not match")]
    for proto, packed, reason in cases:
        model = ir.from_proto(proto)
        model.graph.node("proj").meta[WEIGHT_KEY] = packed
        emit = EmitDequantizeLinearPass()
        assert not emit(model).modified
        assert reason in emit.skipped[0][1] and reason in emit.summary
        assert op_types(model) == ["MatMul"] and model.opset_imports[""] == graphs.OPSET
        assert EMITTED_KEY not in model.graph.node("proj").meta
