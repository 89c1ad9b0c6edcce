import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from passes.emit_dequantize_linear import EmitDequantizeLinearPass
from passes.emit_matmulnbits import EmitMatMulNBitsPass, block_size, pack
from qcompiler.packed_weight import WEIGHT_KEY
from tests.passes.helpers import op_types, run
from tests.passes.test_emit_dequantize_linear import (
    affine,
    assert_close,
    check_tied,
    codebook,
    emitted,
    inputs,
    matmul_model,
    offset,
    reference,
    saved_bytes,
)


def both(packed):
    """``(MatMulNBits model, DequantizeLinear model)`` for the same packed weight."""
    return emitted(EmitMatMulNBitsPass(), packed), emitted(EmitDequantizeLinearPass(), packed)


def check_same_numbers(packed):
    """Each emitter equals numpy ``x @ W`` and the other; both are idempotent."""
    nbits, dq = both(packed)
    x = inputs(packed.shape[0])
    expected = reference(x, packed)
    y_nbits, y_dq = run(nbits, {"x": x})[0], run(dq, {"x": x})[0]
    assert_close(y_nbits, expected)  # accuracy_level 0: measured ≤ 1e-6 of max|y|
    assert_close(y_nbits, y_dq)
    assert nbits.graph.outputs[0].name == "y" and "w" not in nbits.graph.initializers
    assert not EmitMatMulNBitsPass()(nbits).modified
    return nbits


def attributes(model: ir.Model) -> dict:
    node = model.graph.node(0)
    names = ("K", "N", "bits", "block_size", "accuracy_level")
    return {name: node.attributes.get_int(name) for name in names}


def input_types(model: ir.Model) -> list:
    return [None if v is None else v.const_value.dtype for v in model.graph.node(0).inputs[1:]]


AFFINE = [
    (k, bits, g, sym)
    for k in (64, 96, 576)
    for g in (32, 64, 128, None)
    if g is None or k % g == 0
    for bits in (2, 4, 8)
    for sym in (True, False)
] + [(96, 4, 64, False),  # ragged: the last group has 32 rows, B is padded to K = 128
       (100, 4, None, True)]  # per-channel, no power of two divides K: blocks of 32, padded


@pytest.mark.parametrize("k, bits, group, symmetric", AFFINE)
def test_affine_is_one_matmulnbits_with_the_same_numbers_as_dequantize_linear(k, bits, group, symmetric):
    _, w = matmul_model(k, 6)
    model = check_same_numbers(affine(w, bits, group, symmetric))
    assert op_types(model) == ["MatMulNBits"] and model.opset_imports["com.microsoft"] == 1
    expected_block = block_size(group or k, k)
    assert attributes(model) == dict(K=k, N=6, bits=bits, block_size=expected_block, accuracy_level=0)
    blocks = -(-k // expected_block)
    weights, scales = (v.const_value for v in model.graph.node(0).inputs[1:3])
    assert weights.shape == (6, blocks, expected_block * bits // 8) and scales.shape == (6, blocks)
    # symmetric: q + 2^(b−1) against the default zero point; affine: packed uint8 zero points
    assert input_types(model)[2:] == ([] if symmetric else [ir.DataType.UINT8])


@pytest.mark.parametrize("k, bits, group", [(64, 4, 32), (96, 4, 32), (576, 4, 32), (576, 4, None),
                                            (64, 2, 32), (96, 4, 64)])
def test_offset_uses_a_float_zero_point_minus_m_over_s(k, bits, group):
    model = check_same_numbers(offset(k, 5, bits, group))
    assert op_types(model) == ["MatMulNBits"]
    assert input_types(model)[2] == ir.DataType.FLOAT


def check_same_numbers_with(emit, packed) -> ir.Model:
    model = emitted(emit, packed)
    x = inputs(packed.shape[0])
    y = run(model, {"x": x})[0]
    assert_close(y, reference(x, packed))
    assert_close(y, run(emitted(EmitDequantizeLinearPass(), packed), {"x": x})[0])
    assert not EmitMatMulNBitsPass()(model).modified
    return model


FALLBACKS = [
    (lambda w: affine(w, 3, 32, True), "3-bit"),
    (lambda w: affine(w, 5, 32, False), "5-bit"),
    (lambda w: affine(w, 4, 8, False), "group size 8"),
    (lambda w: offset(64, 4, 8, 32), "8-bit offset"),
    (lambda w: codebook(64, 4, 4, per_channel=True), "codebook"),
    (lambda w: codebook(64, 4, 2, per_channel=False), "codebook"),
    (lambda w: dataclasses.replace(affine(w, 4, 32, False), bits=2), "outside the 2-bit range"),
]


@pytest.mark.parametrize("make, reason", FALLBACKS)
def test_what_matmulnbits_cannot_express_falls_back_to_dequantize_linear(make, reason):
    packed = make(matmul_model(64, 4)[1])
    emit = EmitMatMulNBitsPass()
    model = check_same_numbers_with(emit, packed)
    assert "MatMulNBits" not in op_types(model) and model.opset_imports[""] == 21
    assert emit.fallbacks == [("proj", emit.fallbacks[0][1])] and reason in emit.fallbacks[0][1]
    assert reason in emit.summary


def test_an_offset_block_with_zero_scale_falls_back():
    packed = offset(64, 4, 4, 32)
    packed.scale[1, 2] = 0.0  # a constant block: W = m there, no zero point −m/s exists
    emit = EmitMatMulNBitsPass()
    check_same_numbers_with(emit, packed)
    assert "zero scale" in emit.fallbacks[0][1]


def test_block_size_is_the_largest_power_of_two_in_16_to_256_dividing_the_group():
    groups = (16, 32, 96, 128, 512, 8, 24)
    assert [block_size(g, 4096) for g in groups] == [16, 32, 32, 128, 256, None, None]
    # per-channel (g = K): any block shares the column's scale; ORT 1.31 CPU stops at 256
    assert [block_size(k, k) for k in (64, 576, 1536, 100)] == [64, 64, 256, 32]


def test_pack_puts_the_first_value_in_the_low_bits():
    assert pack(np.array([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]
    assert pack(np.array([[1, 2, 3, 0, 3]]), 2).tolist() == [[0b00111001, 0b11]]
    assert pack(np.array([[7, 200]]), 8).tolist() == [[7, 200]]


def test_accuracy_level_4_quantizes_activations_inside_the_kernel():
    _, w = matmul_model(576, 8)
    packed = affine(w, 4, 32, symmetric=False)
    model = emitted(EmitMatMulNBitsPass(accuracy_level=4), packed)
    assert attributes(model)["accuracy_level"] == 4
    x = inputs(576)
    expected = reference(x, packed)
    error = np.abs(run(model, {"x": x})[0] - expected).max() / np.abs(expected).max()
    assert 1e-4 < error < 2e-2  # measured 4.7e-3: int8 x per block


def test_a_4_bit_g128_weight_takes_under_0_3x_of_float32_on_disk(tmp_path):
    k, n = 1024, 256
    _, w = matmul_model(k, n)
    model = emitted(EmitMatMulNBitsPass(), affine(w, 4, 128, symmetric=False))
    assert op_types(model) == ["MatMulNBits"]
    size = saved_bytes(model, tmp_path / "w4.onnx")
    assert size <= 0.3 * w.nbytes, size / w.nbytes  # measured: 0.13


def test_a_tied_lm_head_keeps_the_float_table_for_the_embedding_gather():
    model = check_tied(EmitMatMulNBitsPass())
    assert op_types(model) == ["Gather", "MatMulNBits"]


def test_input_of_rank_2_and_4():
    for lead in ((7,), (2, 3, 4)):
        _, w = matmul_model(64, 4)
        packed = affine(w, 4, 32, symmetric=True)
        model = ir.from_proto(matmul_model(64, 4)[0])
        model.graph.inputs[0].shape = ir.Shape([*lead, 64])
        model.graph.outputs[0].shape = ir.Shape([*lead, 4])
        model.graph.node("proj").meta[WEIGHT_KEY] = packed
        assert EmitMatMulNBitsPass()(model).modified
        x = np.random.default_rng(0).normal(size=(*lead, 64)).astype(np.float32)
        assert_close(run(model, {"x": x})[0], reference(x, packed))
