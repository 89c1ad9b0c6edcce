import numpy as np
from onnx import numpy_helper

from passes.bias_correction import BiasCorrectionPass, output_shift
from passes.calibrate import STATS_KEY
from passes.quantize_weights import QuantizeWeightsPass, WEIGHT_KEY
from passes.select_targets import SelectTargetsPass, targets
from qcompiler.ranges import TensorStats
from tests import graphs
from tests.passes.helpers import check, run, to_ir

OPS = ("MatMul", "Gemm", "Conv")


def _with_stats(proto, samples):
    """Annotate, attach streaming statistics of the given input samples, quantize weights."""
    model = to_ir(proto)
    SelectTargetsPass(OPS)(model)
    for t in targets(model):
        stats = TensorStats(channel_axis=1 if t.op_type == "Conv" else -1)
        for x in samples:
            stats.update(x)
        t.activation.meta[STATS_KEY] = stats
    QuantizeWeightsPass()(model)
    return model


def test_conv_output_mean_matches_float_after_correction():
    proto = graphs.conv(c_in=3, c_out=8)
    rng = np.random.default_rng(0)
    # inputs with a non-zero mean per channel: the case where ΔW·E[x] is large
    xs = [(rng.normal(size=(4, 3, 8, 8)) + np.array([2.0, -1.0, 3.0])[None, :, None, None]).astype(np.float32) for _ in range(4)]
    model = _with_stats(proto, xs)
    float_model = to_ir(proto)
    before = np.mean([run(model, {"x": x})[0] - run(float_model, {"x": x})[0] for x in xs], axis=(0, 1, 3, 4))
    result = BiasCorrectionPass()(model)
    assert result.modified
    check(model)
    after = np.mean([run(model, {"x": x})[0] - run(float_model, {"x": x})[0] for x in xs], axis=(0, 1, 3, 4))
    # Relu follows the conv and borders are padded, so the correction is not exact; it must
    # still remove most of the systematic shift
    assert np.abs(after).mean() < 0.5 * np.abs(before).mean()


def test_output_shift_formula_against_direct_computation():
    proto = graphs.conv(c_in=4, c_out=6)
    model = _with_stats(proto, [np.ones((1, 4, 8, 8), np.float32)])
    target = targets(model)[0]
    dq = target.node.meta[WEIGHT_KEY].dequantize()
    mean = np.array([1.0, 2.0, -1.0, 0.5], np.float32)
    expected = np.einsum("ochw,c->o", dq - target.weight, mean)
    np.testing.assert_allclose(output_shift(target, dq, mean), expected, rtol=1e-6)


def test_depthwise_conv_uses_each_channels_own_mean():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    b = np.zeros(4, np.float32)
    proto = graphs.make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=4, pads=[1, 1, 1, 1], name="dw")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        {"w": w, "b": b},
    )
    model = _with_stats(proto, [np.ones((1, 4, 6, 6), np.float32)])
    target = targets(model)[0]
    dq = target.node.meta[WEIGHT_KEY].dequantize()
    mean = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    expected = (dq - w).reshape(4, -1).sum(1) * mean
    np.testing.assert_allclose(output_shift(target, dq, mean), expected, rtol=1e-6)


def test_matmul_bias_is_found_in_the_following_add_and_copied():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)
    proto = graphs.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
         helper.make_node("Add", ["m", "bias"], ["y"], name="add"),
         helper.make_node("Add", ["y", "bias"], ["z"], name="other_reader")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        {"w": w, "bias": bias},
    )
    xs = [(rng.normal(size=(16, 8)) + 3.0).astype(np.float32)]
    model = _with_stats(proto, xs)
    BiasCorrectionPass()(model)
    check(model)
    add = next(n for n in model.graph if n.name == "add")
    other = next(n for n in model.graph if n.name == "other_reader")
    assert add.inputs[1].name != "bias" and other.inputs[1].name == "bias"  # shared bias untouched
    target = targets(model)[0]
    shift = (np.mean(xs[0], axis=0) @ (target.node.meta[WEIGHT_KEY].dequantize() - w))
    np.testing.assert_allclose(add.inputs[1].const_value.numpy(), bias - shift, rtol=1e-5, atol=1e-6)


def test_targets_without_bias_or_statistics_are_skipped_and_second_run_is_a_no_op():
    model = _with_stats(graphs.mlp(), [np.ones((1, 2, 32), np.float32)])
    assert not BiasCorrectionPass()(model).modified  # mlp's MatMuls have no bias
    model = _with_stats(graphs.conv(), [np.ones((1, 3, 8, 8), np.float32)])
    assert BiasCorrectionPass()(model).modified
    assert not BiasCorrectionPass()(model).modified
    model = to_ir(graphs.conv())
    SelectTargetsPass(OPS)(model)
    QuantizeWeightsPass()(model)
    assert not BiasCorrectionPass()(model).modified  # no statistics: dynamic schemes
