import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript.rewriter import MatchingTracer, MatchStatus

from passes.cleanup import CleanupPass
from passes.integer_ops import (
    MS,
    FuseIntegerOpsPass,
    absorbable,
    activation_refusal,
    rule_stages,
    unshare_dequantize,
)
from passes.precompute_bias import PrecomputeBiasPass
from qcompiler import quant_math as qm
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir


def _qdq_model(proto, precompute=True):
    model = to_ir(proto)
    if precompute:
        PrecomputeBiasPass()(model)
    return model


def _fused(model):
    """(fused model, the QDQ model it came from, the pass result)."""
    reference = ir.from_proto(ir.to_proto(model))
    fuse = FuseIntegerOpsPass()
    result = fuse(model)
    CleanupPass()(model)
    return model, reference, result


def _feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    return {
        v.name: (rng.normal(size=[int(d) for d in v.shape]) * 1.5).astype(np.float32)
        for v in model.graph.inputs
    }


def _assert_8bit_close(got, expected):
    """Requantization in the kernel may round differently: ≤ 1 level, and mostly exact."""
    assert got.dtype == expected.dtype == np.uint8
    diff = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= 1
    assert np.mean(diff == 0) >= 0.9


def _refusals(model) -> set[str]:
    """Reasons the checks of every stage gave (a tracer leaves the model unchanged)."""
    reasons = set()
    for stage in rule_stages():
        tracer = MatchingTracer()
        stage.apply_to_model(model, tracer=tracer)
        reasons |= {
            info.match_result.reason
            for infos in tracer.best_matches_map.values()
            for info in infos
            if info.status == MatchStatus.CONDITION_FAILED
        }
    return reasons


def _node(model, op_type):
    (node,) = [n for n in model.graph if n.op_type == op_type]
    return node


# --- QLinearConv -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "act, out_q",
    [
        (None, (0.05, 128)),
        ("Relu", (0.04, 0)),  # zero point 0 = the grid's minimum: Q clips at 0 as Relu does
        ("Clip", (6 / 255, 0)),  # grid [0, 6]: Q saturates at the clip bounds
        ("Clip", (4 / 255, 0)),  # grid [0, 4] inside [0, 6]: the clip never acts
    ],
)
def test_conv_becomes_qlinearconv(act, out_q):
    model, reference, result = _fused(_qdq_model(graphs.qdq_linear("Conv", act=act, out_q=out_q)))
    assert result.modified
    check(model)
    assert op_types(model) == ["QuantizeLinear", "QLinearConv"]  # activation absorbed, bias inside
    conv = _node(model, "QLinearConv")
    assert conv.inputs[0].producer().op_type == "QuantizeLinear"
    assert conv.outputs[0].name == "y" and list(conv.attributes["pads"].as_ints()) == [1, 1, 1, 1]
    assert conv.inputs[8].const_value.dtype == ir.DataType.INT32
    feeds = _feeds(model)
    _assert_8bit_close(run(model, feeds)[0], run(reference, feeds)[0])
    assert not FuseIntegerOpsPass()(model).modified


@pytest.mark.parametrize(
    "act, out_q, reason",
    [
        ("Relu", (0.04, 10), "Relu lower bound 0.0 is above the output grid's minimum"),
        ("Clip", (8 / 255, 0), "Clip upper bound 6.0 is inside the output grid (would not clip)"),
        ("Clip", (6 / 255, 5), "Clip lower bound 0.0 is above the output grid's minimum"),
    ],
)
def test_activation_that_the_output_grid_does_not_clip_is_refused(act, out_q, reason):
    model = _qdq_model(graphs.qdq_linear("Conv", act=act, out_q=out_q))
    q = next(n for n in model.graph if n.name == "y_quant")
    assert absorbable(_node(model, act), q.inputs[1], q.inputs[2]) == reason
    assert _refusals(model) == {reason}
    before = op_types(model)
    assert not FuseIntegerOpsPass()(model).modified
    assert op_types(model) == before


@pytest.mark.parametrize("op", ["Conv", "MatMul"])
def test_int8_activation_is_refused(op):
    out_q = (0.05, 128) if op == "Conv" else None
    model = _qdq_model(graphs.qdq_linear(op, x_dtype=np.int8, x_zero=0, out_q=out_q))
    dq = next(n for n in model.graph if n.name == "x_dequant")
    why = activation_refusal(dq.inputs[1], dq.inputs[2])
    assert why is not None and "uint8" in why and "int8" in why
    assert _refusals(model) == {why}
    assert not FuseIntegerOpsPass()(model).modified


def test_per_axis_activation_is_refused():
    model = _qdq_model(graphs.qdq_linear("Conv", x_scale=[0.05, 0.1, 0.2], out_q=(0.05, 128)))
    assert _refusals(model) == {"activation scale is not a constant scalar (per-tensor)"}
    assert not FuseIntegerOpsPass()(model).modified
    assert "QLinearConv" not in op_types(model)


def test_float_bias_is_refused_until_precompute_bias_runs():
    model = _qdq_model(graphs.qdq_linear("Conv", out_q=(0.05, 128)), precompute=False)
    assert _refusals(model) == {"bias is not int32 behind DequantizeLinear (run PrecomputeBiasPass)"}
    assert not FuseIntegerOpsPass()(model).modified
    PrecomputeBiasPass()(model)
    assert FuseIntegerOpsPass()(model).modified and "QLinearConv" in op_types(model)


def _two_convs_sharing_input():
    """x → Q → DQ, read by two Convs (each with its own weight, bias and output Q)."""
    rng = np.random.default_rng(3)
    inits = {"x_s": np.float32(0.05), "x_z": np.uint8(128)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], name="x_dequant"),
    ]
    for i in ("a", "b"):
        w_q, w_s = graphs.symmetric_int8(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), 0)
        inits.update({f"w_q{i}": w_q, f"w_s{i}": w_s, f"w_z{i}": np.zeros(4, np.int8),
                      f"b{i}": rng.normal(0, 0.2, 4).astype(np.float32),
                      f"y_s{i}": np.float32(0.05), f"y_z{i}": np.uint8(128)})
        nodes += [
            helper.make_node("DequantizeLinear", [f"w_q{i}", f"w_s{i}", f"w_z{i}"], [f"w_dq{i}"], axis=0,
                             name=f"w_dequant{i}"),
            helper.make_node("Conv", ["x_dq", f"w_dq{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node("QuantizeLinear", [f"c{i}", f"y_s{i}", f"y_z{i}"], [f"y{i}"], name=f"y_quant{i}"),
        ]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.UINT8, [1, 4, 5, 5]) for i in ("a", "b")],
        inits,
        opset=graphs.QDQ_OPSET,
    )


def test_shared_dequantize_is_duplicated_and_both_convs_fuse():
    model = _qdq_model(_two_convs_sharing_input())
    assert unshare_dequantize(ir.from_proto(ir.to_proto(model)).graph) == 1
    model, reference, result = _fused(model)
    assert result.modified
    check(model)
    assert op_types(model) == ["QuantizeLinear", "QLinearConv", "QLinearConv"]
    feeds = _feeds(model)
    for got, expected in zip(run(model, feeds), run(reference, feeds)):
        _assert_8bit_close(got, expected)
    assert unshare_dequantize(model.graph) == 0


# --- QLinearMatMul, QLinearAdd, QLinearGlobalAveragePool ---------------------------------------


def test_matmul_with_quantized_output_becomes_qlinearmatmul():
    proto = graphs.qdq_linear("MatMul", bias=False, out_q=(0.05, 128))
    model, reference, result = _fused(_qdq_model(proto))
    assert result.modified
    check(model)
    assert op_types(model) == ["QuantizeLinear", "QLinearMatMul"]
    assert _node(model, "QLinearMatMul").domain == ""  # the standard op, not com.microsoft
    feeds = _feeds(model)
    _assert_8bit_close(run(model, feeds)[0], run(reference, feeds)[0])
    assert not FuseIntegerOpsPass()(model).modified


def _quantized_input(name, scale, zero):
    inits = {f"{name}_s": np.float32(scale), f"{name}_z": np.uint8(zero)}
    nodes = [
        helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_quant"),
        helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"],
                         name=f"{name}_dequant"),
    ]
    return nodes, inits


def _qdq_add():
    """DQ(a) + DQ(b) → Q: different grids on the three tensors."""
    nodes_a, inits = _quantized_input("a", 0.03, 120)
    nodes_b, inits_b = _quantized_input("b", 0.05, 100)
    inits.update(inits_b, y_s=np.float32(0.06), y_z=np.uint8(128))
    nodes = nodes_a + nodes_b + [
        helper.make_node("Add", ["a_dq", "b_dq"], ["s"], name="residual"),
        helper.make_node("QuantizeLinear", ["s", "y_s", "y_z"], ["y"], name="y_quant"),
    ]
    shape = [1, 4, 3, 3]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, shape)],
        inits,
        opset=graphs.QDQ_OPSET,
    )


def _qdq_pool(op_type, axes=(2, 3)):
    nodes, inits = _quantized_input("x", 0.04, 128)
    inits.update(y_s=np.float32(0.01), y_z=np.uint8(128))
    if op_type == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["x_dq"], ["p"], name="pool"))
    else:
        inits["axes"] = np.array(axes, np.int64)
        nodes.append(helper.make_node("ReduceMean", ["x_dq", "axes"], ["p"], keepdims=1, name="pool"))
    nodes.append(helper.make_node("QuantizeLinear", ["p", "y_s", "y_z"], ["y"], name="y_quant"))
    out = np.zeros((1, 4, 5, 5)).mean(axis=(2, 3) if op_type == "GlobalAveragePool" else axes, keepdims=True)
    # shapes inferred, as the Q/DQ pass leaves them: the ReduceMean form needs its input's rank
    return onnx.shape_inference.infer_shapes(graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, list(out.shape))],
        inits,
        opset=graphs.QDQ_OPSET,
    ))


@pytest.mark.parametrize(
    "proto, fused_op",
    [
        pytest.param(_qdq_add(), "QLinearAdd", id="add"),
        pytest.param(_qdq_pool("GlobalAveragePool"), "QLinearGlobalAveragePool", id="global-average-pool"),
        pytest.param(_qdq_pool("ReduceMean"), "QLinearGlobalAveragePool", id="reduce-mean"),
    ],
)
def test_elementwise_and_pooling_become_com_microsoft_kernels(proto, fused_op):
    model, reference, result = _fused(_qdq_model(proto))
    assert result.modified
    ops = op_types(model)
    assert ops.count(fused_op) == 1 and "DequantizeLinear" not in ops
    assert ops.count("QuantizeLinear") == len(model.graph.inputs)  # only the input Qs remain
    assert _node(model, fused_op).domain == MS
    feeds = _feeds(model)
    _assert_8bit_close(run(model, feeds)[0], run(reference, feeds)[0])
    assert not FuseIntegerOpsPass()(model).modified


def test_reduce_mean_over_channels_is_not_pooling():
    model = _qdq_model(_qdq_pool("ReduceMean", axes=(1,)))
    assert _refusals(model) == {"not a mean over both spatial axes of NCHW with keepdims"}
    assert not FuseIntegerOpsPass()(model).modified


# --- float outputs: MatMulIntegerToFloat -------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(op="MatMul"), id="matmul-add"),
        pytest.param(dict(op="MatMul", bias_first=True), id="add-matmul"),
        pytest.param(dict(op="MatMul", bias=False), id="matmul"),
        pytest.param(dict(op="Gemm", trans_b=1), id="gemm-transB"),
        pytest.param(dict(op="Gemm", trans_b=0, alpha=0.5, beta=2.0), id="gemm-alpha-beta"),
    ],
)
def test_float_output_linear_becomes_one_matmul_integer_to_float(kw):
    model, reference, result = _fused(_qdq_model(graphs.qdq_linear(**kw)))
    assert result.modified
    # regression: MatMul + Add(bias) is ONE kernel with the bias (and −z_x·ΣW^q) folded in
    assert op_types(model) == ["QuantizeLinear", "MatMulIntegerToFloat"]
    node = _node(model, "MatMulIntegerToFloat")
    assert node.domain == MS
    assert node.inputs[4] is None and node.inputs[5] is None  # zero point folded into the bias
    assert len(node.inputs) == 7 and node.inputs[6].const_value is not None
    assert node.inputs[1].const_value.shape == ir.Shape([16, 8])  # [K, N], transB undone
    feeds = _feeds(model)
    np.testing.assert_allclose(run(model, feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-5)
    assert not FuseIntegerOpsPass()(model).modified


def test_weight_zero_point_other_than_zero_is_refused():
    proto = graphs.qdq_linear("MatMul", bias=False)
    w_z = next(t for t in proto.graph.initializer if t.name == "w_z")
    w_z.CopyFrom(numpy_helper.from_array(np.ones(8, np.int8), "w_z"))
    model = _qdq_model(proto)
    assert _refusals(model) == {"weight zero point is not 0"}
    assert not FuseIntegerOpsPass()(model).modified


# --- the integer identity behind the folded bias ---------------------------------------------


def test_matmul_integer_plus_folded_bias_is_bit_exact():
    """ONNX ``MatMulInteger(x^q, W^q) + B^q`` (no zero points) equals the int64 reference
    ``Σ (x^q − z_x) W^q + b^q`` exactly, with ``B^q = b^q − z_x ΣW^q``."""
    rng = np.random.default_rng(7)
    x_q = rng.integers(0, 256, (5, 64)).astype(np.uint8)
    w_q = rng.integers(-127, 128, (64, 12)).astype(np.int8)
    b_q = rng.integers(-50_000, 50_000, 12).astype(np.int32)
    z_x = 131
    folded = qm.fold_zero_point(b_q, z_x, w_q, (0,))
    nodes = [
        helper.make_node("MatMulInteger", ["x_q", "w_q"], ["acc"]),
        helper.make_node("Add", ["acc", "bias"], ["y"]),
    ]
    proto = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x_q", TensorProto.UINT8, [5, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [5, 12])],
        {"w_q": w_q, "bias": folded},
        opset=graphs.QDQ_OPSET,
    )
    got = run(proto, {"x_q": x_q})[0]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, qm.integer_matmul(x_q, z_x, w_q, b_q))


def test_weight_quantized_along_the_input_axis_is_refused_or_exact():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], name="x_dequant"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=0, name="w_dequant"),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="matmul"),
    ]
    proto = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        {
            "x_s": np.float32(0.02), "x_z": np.uint8(128),
            "w_q": rng.integers(-127, 128, (8, 8)).astype(np.int8),
            "w_s": np.linspace(0.01, 0.08, 8).astype(np.float32),  # one scale per row k (axis 0)
            "w_z": np.zeros(8, np.int8),
        },
        opset=graphs.QDQ_OPSET,
    )
    model, reference, _ = _fused(_qdq_model(proto))
    feeds = _feeds(model)
    np.testing.assert_allclose(run(model, feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-5)
