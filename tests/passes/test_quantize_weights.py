import numpy as np
import onnx_ir as ir

from passes.quantize_weights import QuantizeWeightsPass, quantize_weight
from passes.select_targets import SelectTargetsPass
from passes.cleanup import CleanupPass
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir

OPS = ("MatMul", "Gemm", "Conv")


def test_quantize_weight_is_symmetric_per_channel_int8():
    w = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    t = quantize_weight(w, channel_axis=1)
    expected_scale = np.abs(w).max(axis=0) / 127.0
    np.testing.assert_allclose(t.scale.reshape(-1), expected_scale, rtol=1e-7)
    np.testing.assert_array_equal(t.q, np.clip(np.rint(w / expected_scale), -127, 127).astype(np.int8))
    assert t.q.min() >= -127  # -128 never used


def _quantized_mlp():
    model = to_ir(graphs.mlp())
    SelectTargetsPass(OPS)(model)
    result = QuantizeWeightsPass()(model)
    CleanupPass()(model)
    return model, result


def test_weights_feed_matmuls_through_dequantize_linear():
    model, result = _quantized_mlp()
    assert result.modified
    check(model)
    assert op_types(model).count("DequantizeLinear") == 2
    assert "Transpose" not in op_types(model)  # tied weight stored viewed; float source dropped
    assert not any(v.const_value.dtype.name == "FLOAT" and v.name in ("w1", "w2t") for v in model.graph.initializers.values())
    for node in model.graph:
        if node.op_type == "MatMul":
            assert node.inputs[1].producer().op_type == "DequantizeLinear"


def test_output_equals_float_model_with_numpy_dequantized_weights():
    proto = graphs.mlp()
    model, _ = _quantized_mlp()
    x = np.random.default_rng(1).normal(size=(2, 3, 32)).astype(np.float32)
    init = {t.name: t for t in proto.graph.initializer}
    from onnx import numpy_helper

    w1 = numpy_helper.to_array(init["w1"])
    w2 = numpy_helper.to_array(init["w2t"]).T
    dq = lambda w: quantize_weight(w, 1).dequantize()  # noqa: E731
    expected = np.maximum(x @ dq(w1), 0) @ dq(w2) + x
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_second_run_changes_nothing():
    model, _ = _quantized_mlp()
    assert not QuantizeWeightsPass()(model).modified
    reloaded = to_ir(ir.to_proto(model))  # annotations gone: a compiled model read back from disk
    assert not SelectTargetsPass(OPS)(reloaded).modified  # DQ weights are no longer float constants
