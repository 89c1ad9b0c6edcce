"""FP8 E4M3: the math against onnx.reference's QuantizeLinear, the Q/DQ passes on a tiny MLP
(numbers in ONNX Runtime vs numpy + ml_dtypes), idempotence, and the GemmFloat8 emission
(structure, and numbers under a reference implementation of the contrib op)."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from passes.calibrate import STATS_KEY
from passes.cleanup import CleanupPass
from passes.emit_gemm_float8 import EmitGemmFloat8Pass
from passes.quantize_fp8 import InsertFP8QDQPass, QuantizeFP8WeightsPass
from passes.select_targets import SelectTargetsPass, targets
from passes.upgrade_opset import UpgradeOpsetPass
from qcompiler import fp8
from qcompiler import quant_math as qm
from qcompiler.config import CalibrationConfig, FP8Config
from qcompiler.errors import QCompileError
from qcompiler.ranges import TensorStats
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir

E4M3 = ml_dtypes.float8_e4m3fn
RANGES = {"fc1": (-3.0, 2.5), "fc2": (0.0, 7.0)}


def _reference_quantize(x, scale):
    """onnx.reference's QuantizeLinear (opset 19, saturate) — an implementation independent of ours."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, None)],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]),
         helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])]),
        opset_imports=[helper.make_opsetid("", 19)])
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def test_fp8_quantize_equals_onnx_reference_including_saturation_and_ties():
    rng = np.random.default_rng(0)
    scale = np.float32(0.37)
    x = np.concatenate([rng.normal(0, 40, 2000), [1e6, -1e6, 448 * 0.37, 0.0, 1.0625 * 0.37]]).astype(np.float32)
    ours = fp8.quantize(x, scale)
    np.testing.assert_array_equal(ours.view(np.uint8), _reference_quantize(x, scale).view(np.uint8))
    assert float(ours[2000]) == 448.0 and float(ours[2001]) == -448.0  # saturates, no NaN
    np.testing.assert_array_equal(fp8.dequantize(ours, scale), ours.astype(np.float32) * scale)


def test_per_channel_weights_use_amax_over_448_per_output_channel():
    w = np.random.default_rng(1).normal(0, 1, (16, 5)).astype(np.float32) * np.array([1, 10, 100, 0.01, 0], np.float32)
    quantized = fp8.quantize_tensor(w, qm.PerAxis(1))
    want_scale = np.maximum(np.abs(w).max(axis=0) / 448, qm.MIN_SCALE)
    np.testing.assert_allclose(quantized.scale.reshape(-1), want_scale, rtol=1e-7)
    for c in range(5):
        np.testing.assert_array_equal(quantized.q[:, c].view(np.uint8),
                                      _reference_quantize(w[:, c], want_scale[c]).view(np.uint8))


def test_mse_amax_clips_an_outlier_and_never_exceeds_the_range():
    stats = TensorStats()
    x = np.concatenate([np.random.default_rng(2).normal(0, 1, 20000), [400.0]]).astype(np.float32)
    stats.update(x[:, None])
    amax = fp8.mse_amax(stats)
    assert 0 < amax <= 400.0
    assert fp8.activation_amax(stats, "minmax") == pytest.approx(400.0)


def test_gptq_on_the_fp8_grid_is_rtn_for_a_diagonal_hessian_and_beats_it_on_correlated_inputs():
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.1, (48, 24)).astype(np.float32)
    scale = fp8.scale_for(np.abs(w).max(axis=0))
    diagonal = np.diag(rng.uniform(0.5, 2.0, 48))
    np.testing.assert_array_equal(fp8.gptq_quantize(w, diagonal, scale).view(np.uint8),
                                  _reference_quantize(w / scale, 1.0).view(np.uint8))
    mix = rng.normal(size=(48, 48)) + 3 * np.eye(48)
    x = (rng.normal(size=(4096, 48)) @ mix).astype(np.float32)  # correlated input features
    q = fp8.gptq_quantize(w, 2 / len(x) * x.astype(np.float64).T @ x, scale)
    q_act_order = fp8.gptq_quantize(w, 2 / len(x) * x.astype(np.float64).T @ x, scale, act_order=True)
    error = lambda v: np.linalg.norm(x @ w - x @ (v.astype(np.float32) * scale))  # noqa: E731
    assert error(q) < 0.8 * error(fp8.quantize(w, scale)) and error(q_act_order) < 0.8 * error(fp8.quantize(w, scale))


def test_weights_pass_uses_gptq_when_the_activation_carries_a_hessian_and_keeps_the_lm_head_float():
    from passes.quantize_fp8 import HESSIAN_KEY

    model = to_ir(graphs.mlp())
    UpgradeOpsetPass(19)(model)
    SelectTargetsPass(("MatMul",))(model)
    rng = np.random.default_rng(8)
    for t in targets(model):
        k = t.weight.shape[0]
        x = rng.normal(size=(512, k)) @ (rng.normal(size=(k, k)) + 2 * np.eye(k))
        t.activation.meta[HESSIAN_KEY] = 2 / len(x) * x.T @ x
    weights = QuantizeFP8WeightsPass(per_channel=True)
    assert weights(model).modified and weights.summary == "2 weights to E4M3 (2 by GPTQ)"
    # A MatMul producing a graph output (an LM head) keeps its float weight unless asked.
    proto = graphs.mlp()
    proto.graph.node[-1].op_type = "Sub"  # any op: fc2's output now only feeds it
    lm = to_ir(proto)
    lm.graph.outputs.append(next(n for n in lm.graph if n.name == "fc2").outputs[0])
    UpgradeOpsetPass(19)(lm)
    SelectTargetsPass(("MatMul",))(lm)
    QuantizeFP8WeightsPass()(lm)
    assert [n.name for n in lm.graph if "qcompile.fp8_weight" in n.meta] == ["fc1"]


def _stats(lo, hi):
    stats = TensorStats()
    stats.update(np.array([[lo], [hi]], np.float32))
    return stats


def _fp8_mlp(per_channel: bool):
    model = to_ir(graphs.mlp())  # opset 18: the upgrade runs
    assert UpgradeOpsetPass(19)(model).modified and model.opset_imports[""] == 19
    SelectTargetsPass(("MatMul",))(model)
    for t in targets(model):
        t.activation.meta[STATS_KEY] = _stats(*RANGES[t.node.name])
    assert QuantizeFP8WeightsPass(per_channel)(model).modified
    assert InsertFP8QDQPass("minmax")(model).modified
    CleanupPass()(model)
    return model


def _fake_quant(x, amax, axis=None):
    """numpy + ml_dtypes: s = amax/448, x̂ = s · E4M3(clip(x/s))."""
    scale = np.float32(amax) / np.float32(448)
    return np.clip(x / scale, -448, 448).astype(E4M3).astype(np.float32) * scale


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_qdq_mlp_matches_numpy_and_second_run_changes_nothing(per_channel):
    proto = graphs.mlp()
    w = {i.name: np.frombuffer(i.raw_data, np.float32).reshape(i.dims) for i in proto.graph.initializer}
    model = _fp8_mlp(per_channel)
    check(model)
    assert op_types(model).count("QuantizeLinear") == 2 and op_types(model)[-1] == "Add"
    dq_weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    assert {n.inputs[0].const_value.dtype for n in dq_weights} == {ir.DataType.FLOAT8E4M3FN}
    assert all(("axis" in n.attributes) == per_channel for n in dq_weights)

    def weight(m):
        amax = np.abs(m).max(axis=0) if per_channel else np.abs(m).max()
        return _fake_quant(m, amax)

    x = np.random.default_rng(3).normal(0, 1.5, (2, 5, 32)).astype(np.float32)
    h = np.maximum(_fake_quant(x, 3.0) @ weight(w["w1"]), 0)
    want = _fake_quant(h, 7.0) @ weight(w["w2t"].T) + x
    np.testing.assert_allclose(run(model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    # Idempotent: nothing left to do.
    assert not QuantizeFP8WeightsPass(per_channel)(model).modified
    assert not InsertFP8QDQPass("minmax")(model).modified
    assert not UpgradeOpsetPass(19)(model).modified


def test_marked_fp8_model_runs_exactly_in_a_default_onnx_runtime_session(tmp_path):
    from runtime import float8
    from runtime.session import create_session

    model = _fp8_mlp(per_channel=True)
    assert model.metadata_props[float8.METADATA_KEY] == "1"
    path = tmp_path / "mlp.fp8.onnx"
    ir.save(model, path)
    assert float8.marked(path) and not float8.marked(ir.to_proto(to_ir(graphs.mlp())).SerializeToString())
    x = np.random.default_rng(5).normal(0, 1.5, (2, 5, 32)).astype(np.float32)
    # ONNX Runtime's CPU QDQ fusions would take the float8 pairs for integer ones.
    np.testing.assert_array_equal(create_session(path).run(None, {"x": x})[0], run(model, {"x": x})[0])


class GemmFloat8(OpRun):
    """com.microsoft.GemmFloat8 as ONNX Runtime documents it: Y = alpha·(s_A·A)(s_B·B)ᵀ (transB=1)."""

    op_domain = "com.microsoft"

    def _run(self, A, B, C=None, scaleA=None, scaleB=None, scaleY=None, transA=0, transB=0, alpha=1.0,
             beta=0.0, dtype=1, activation=None):
        a = A.astype(np.float32) * scaleA
        b = B.astype(np.float32) * scaleB
        a = a.T if transA else a
        b = b.T if transB else b
        return ((alpha * a @ b).astype(np.float32),)


def test_ort_cuda_emits_gemm_float8_in_tn_layout_with_the_same_numbers():
    model = _fp8_mlp(per_channel=False)
    x = np.random.default_rng(4).normal(0, 1.5, (2, 5, 32)).astype(np.float32)
    want = run(model, {"x": x})[0]
    weights = {n.outputs[0].name: n.inputs[0].const_value.numpy() for n in model.graph
               if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None}
    assert EmitGemmFloat8Pass()(model).modified
    CleanupPass()(model)
    assert not EmitGemmFloat8Pass()(model).modified
    gemms = [n for n in model.graph if n.op_type == "GemmFloat8"]
    assert len(gemms) == 2 and "MatMul" not in op_types(model)
    for node in gemms:
        assert node.domain == "com.microsoft"
        assert node.attributes["transA"].as_int() == 0 and node.attributes["transB"].as_int() == 1
        b = node.inputs[1].const_value
        assert b.dtype == ir.DataType.FLOAT8E4M3FN
        assert node.inputs[0].producer().inputs[0].producer().op_type == "QuantizeLinear"  # via Reshape
    stored = sorted((n.inputs[1].const_value.numpy().view(np.uint8) for n in gemms), key=lambda a: a.shape)
    expected = sorted((w.T.view(np.uint8) for w in weights.values()), key=lambda a: a.shape)
    for got, exp in zip(stored, expected):
        np.testing.assert_array_equal(got, exp)  # the weights stored transposed, [N, K]
    got = ReferenceEvaluator(ir.to_proto(model), new_ops=[GemmFloat8]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fp8_config_refuses_what_cannot_run():
    with pytest.raises(QCompileError, match="per tensor"):
        FP8Config(target="ort-cuda", weights="per-channel")
    with pytest.raises(QCompileError, match="minmax or mse"):
        FP8Config(calibration=CalibrationConfig(method="entropy"))
    assert not FP8Config(target="ort-cuda").per_channel and FP8Config().per_channel
