"""EmitInt4MatMulPass: packed weights → qcompile.Int4MatMul, run in ONNX Runtime with the library."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from passes.emit_custom_ops import EmitInt4MatMulPass, dequantized, unsupported
from passes.emit_dequantize_linear import EmitDequantizeLinearPass
from runtime.session import create_session
from tests.passes.helpers import op_types
from tests.passes.test_emit_dequantize_linear import (
    affine, codebook, emitted, inputs, matmul_model, offset, reference, tied_model)


def run(model: ir.Model, feed: dict) -> list[np.ndarray]:
    """ORT without graph optimisations, our library registered by create_session."""
    return create_session(ir.to_proto(model).SerializeToString(), optimize=False).run(None, feed)


def check_numbers(packed) -> ir.Model:
    """The pass emits one Int4MatMul equal to numpy with the op's fp16 parameters (float32
    rounding), and to the DequantizeLinear model of the same weights to fp16 parameter rounding."""
    model = emitted(EmitInt4MatMulPass(library=True), packed)
    x = inputs(packed.shape[0])
    y = run(model, {"x": x})[0]
    expected = x.astype(np.float64) @ dequantized(packed).astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    standard = run(emitted(EmitDequantizeLinearPass(), packed), {"x": x})[0]
    scale = np.abs(reference(x, packed)).max()
    np.testing.assert_allclose(y, standard, atol=4e-3 * scale)  # fp16 scales: ≤ 2⁻¹¹ per weight
    second = EmitInt4MatMulPass(library=True)
    assert not second(model).modified and second.summary == ""
    return model


@pytest.mark.parametrize("k, group, symmetric", [(64, 32, False), (96, 64, False), (100, None, True),
                                                 (576, 128, True), (64, 16, False)])
def test_affine_weights_become_one_int4matmul(k, group, symmetric):
    _, w = matmul_model(k, 6)
    model = check_numbers(affine(w, 4, group, symmetric))
    assert op_types(model) == ["Int4MatMul"] and model.opset_imports["qcompile"] == 1
    node = model.graph.node(0)
    assert node.domain == "qcompile" and "w" not in model.graph.initializers
    g = min(group or k, k)
    assert [node.attributes.get_int(a) for a in ("K", "N", "group_size")] == [k, 6, g]
    b, s, z = (v.const_value for v in node.inputs[1:])
    assert b.shape == (6, -(-k // g), g // 2) and s.dtype == z.dtype == ir.DataType.FLOAT16


def test_an_offset_grid_takes_a_float_zero_point():
    model = check_numbers(offset(96, 5, 4, 32))
    assert op_types(model) == ["Int4MatMul"]


def test_two_and_three_bit_weights_fit_the_4_bit_container():
    _, w = matmul_model(64, 4)
    for bits in (2, 3):
        assert op_types(check_numbers(affine(w, bits, 32, True))) == ["Int4MatMul"]


@pytest.mark.parametrize("make, reason, op", [
    (lambda w: affine(w, 8, 32, False), "8-bit", "MatMulNBits"),
    (lambda w: codebook(64, 4, 4, per_channel=True), "codebook", "MatMul"),
    (lambda w: dataclasses.replace(affine(w, 4, 32, False), group_size=63), "odd", "MatMul"),
])
def test_what_int4matmul_cannot_express_goes_to_matmulnbits(make, reason, op):
    packed = make(matmul_model(64, 4)[1])
    emit = EmitInt4MatMulPass(library=True)
    model = emitted(emit, packed)
    assert "Int4MatMul" not in op_types(model) and op in op_types(model)
    assert reason in unsupported(packed) and reason in emit.summary
    x = inputs(64)
    np.testing.assert_allclose(run(model, {"x": x})[0], reference(x, packed), rtol=1e-4,
                               atol=1e-4 * np.abs(reference(x, packed)).max())


def test_without_the_library_everything_is_matmulnbits():
    _, w = matmul_model(64, 4)
    emit = EmitInt4MatMulPass(library=False)
    model = emitted(emit, affine(w, 4, 32, False))
    assert op_types(model) == ["MatMulNBits"] and "qcompile" not in model.opset_imports
    assert "library not built" in emit.summary


def test_a_tied_lm_head_keeps_the_float_table_for_the_gather():
    proto, table = tied_model()
    packed = affine(np.ascontiguousarray(table.T), 4, 32, symmetric=True)
    model = emitted(EmitInt4MatMulPass(library=True), packed, proto, node="lm_head")
    assert op_types(model) == ["Gather", "Int4MatMul"] and "table" in model.graph.initializers
    ids = np.array([[0, 7, 95, 7]], np.int64)
    expected = table[ids].astype(np.float64) @ dequantized(packed).astype(np.float64)
    np.testing.assert_allclose(run(model, {"ids": ids})[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
