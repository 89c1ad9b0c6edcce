import numpy as np
import onnx_ir as ir
from onnx import numpy_helper

from passes.calibrate import STATS_KEY
from passes.cleanup import CleanupPass
from passes.insert_static_qdq import InsertStaticQDQPass
from passes.quantize_weights import QuantizeWeightsPass, quantize_weight
from passes.select_targets import SelectTargetsPass, targets
from qcompiler import quant_math as qm
from qcompiler.config import CalibrationConfig
from qcompiler.ranges import TensorStats
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir

OPS = ("MatMul", "Gemm", "Conv")
MINMAX = CalibrationConfig(method="minmax")


def _prepared(proto, ranges):
    model = to_ir(proto)
    SelectTargetsPass(OPS)(model)
    for t in targets(model):
        stats = TensorStats()
        stats.update(np.array(ranges[t.node.name], np.float32))
        t.activation.meta[STATS_KEY] = stats
    QuantizeWeightsPass()(model)
    return model


def _fake_quant(x, lo, hi):
    scale, zero = qm.affine_params(np.float32(lo), np.float32(hi), qm.UINT8)
    return qm.dequantize(qm.quantize(x, scale, zero, qm.UINT8), scale, zero)


def test_activations_get_calibrated_uint8_qdq_and_numbers_match_numpy():
    proto = graphs.mlp()
    model = _prepared(proto, {"fc1": [-3.0, 2.5], "fc2": [0.0, 4.0]})
    assert InsertStaticQDQPass(MINMAX)(model).modified
    CleanupPass()(model)
    check(model)
    q_nodes = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == 2 and all(n.outputs[0].dtype == ir.DataType.UINT8 for n in q_nodes)
    # the residual Add still reads the float input
    residual = next(n for n in model.graph if n.op_type == "Add")
    assert residual.inputs[1].name == "x"

    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = lambda w: quantize_weight(w, 1).dequantize()  # noqa: E731
    x = np.random.default_rng(0).normal(size=(2, 3, 32)).astype(np.float32) * 2
    h = np.maximum(_fake_quant(x, -3.0, 2.5) @ dq(init["w1"]), 0)
    expected = _fake_quant(h, 0.0, 4.0) @ dq(init["w2t"].T) + x
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_one_qdq_pair_serves_all_readers_of_an_activation():
    # q/k/v-like: three MatMuls on one input
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    weights = {f"w{i}": rng.normal(size=(8, 8)).astype(np.float32) for i in range(3)}
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    proto = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 8]) for i in range(3)],
        weights,
    )
    model = _prepared(proto, {f"proj{i}": [-1.0, 1.0] for i in range(3)})
    InsertStaticQDQPass(MINMAX)(model)
    assert op_types(model).count("QuantizeLinear") == 1


def test_second_run_changes_nothing():
    model = _prepared(graphs.mlp(), {"fc1": [-1.0, 1.0], "fc2": [0.0, 1.0]})
    InsertStaticQDQPass(MINMAX)(model)
    assert not InsertStaticQDQPass(MINMAX)(model).modified


def test_targets_without_quantized_weights_are_left_alone():
    model = to_ir(graphs.mlp())
    SelectTargetsPass(OPS)(model)  # weights not quantized
    assert not InsertStaticQDQPass(MINMAX)(model).modified
