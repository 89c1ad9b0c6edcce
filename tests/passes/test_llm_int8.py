"""LLMInt8Pass (--int8-mixed): outlier channels chosen from calibration, MixedInt8MatMul or its
graph form, each checked against an independent numpy LLM.int8() in ONNX Runtime."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from passes.llm_int8 import LLMInt8Pass, choose_outliers
from passes.select_targets import SelectTargetsPass
from qcompiler import cli
from qcompiler.errors import QCompileError
from runtime.session import create_session
from tests import graphs
from tests.passes.helpers import op_types

K, N, OUTLIERS = 64, 24, (5, 40)


def activations(rng, rows: int = 40) -> np.ndarray:
    x = rng.normal(size=(2, rows // 2, K)).astype(np.float32)
    x[..., OUTLIERS] *= 80.0  # two channels dwarf the rest (an LLM's outlier features)
    return x


def model(seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    w = np.random.default_rng(seed).normal(0, 0.2, (K, N)).astype(np.float32)
    proto = graphs.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", N])],
        {"w": w},
    )
    m = ir.from_proto(proto)
    SelectTargetsPass(("MatMul",))(m)
    return m, w


def feeds():
    rng = np.random.default_rng(1)
    return [{"x": activations(rng)} for _ in range(3)]


def run(m: ir.Model, x: np.ndarray) -> np.ndarray:
    return create_session(ir.to_proto(m).SerializeToString(), optimize=False).run(None, {"x": x})[0]


def reference(x: np.ndarray, w: np.ndarray, outliers) -> np.ndarray:
    """LLM.int8() in numpy, written out: int8 rows (outliers zeroed), int8 columns, fp16 outliers."""
    x = x.astype(np.float32)
    o = np.asarray(outliers, np.int64)
    rest_w = w.copy()
    rest_w[o] = 0
    s_w = np.maximum(np.abs(rest_w).max(axis=0) / np.float32(127), np.float32(1e-12))
    w_q = np.clip(np.rint(rest_w / s_w), -127, 127).astype(np.int64)
    rest_x = x.copy()
    rest_x[..., o] = 0
    s_x = np.maximum(np.abs(rest_x).max(axis=-1, keepdims=True), np.float32(1e-8)) / np.float32(127)
    x_q = np.clip(np.rint(rest_x / s_x), -127, 127).astype(np.int64)
    y = (x_q @ w_q).astype(np.float64) * s_x * s_w
    return y + x[..., o].astype(np.float64) @ w[o].astype(np.float16).astype(np.float64)


def lowered(**kwargs) -> tuple[ir.Model, np.ndarray, LLMInt8Pass]:
    m, w = model()
    p = LLMInt8Pass(feeds, max_fraction=0.1, progress=False, **kwargs)
    assert p(m).modified
    assert not LLMInt8Pass(feeds, max_fraction=0.1, progress=False, **kwargs)(m).modified  # idempotent
    return m, w, p


def test_choose_outliers_takes_the_smallest_set_meeting_the_target():
    rng = np.random.default_rng(2)
    x = activations(rng, 400).reshape(-1, K)
    w = rng.normal(0, 0.2, (K, N)).astype(np.float32)
    absmax = np.abs(x).max(axis=0)
    # measured: 0.0185 without outliers, 0.0149 with channel 5, 0.00065 with both
    chosen, error = choose_outliers(x, w, absmax, error_target=0.005, max_count=6)
    assert chosen.tolist() == list(OUTLIERS) and error <= 0.005
    one, error_one = choose_outliers(x, w, absmax, error_target=1e-6, max_count=1)
    assert len(one) == 1 and error_one > 1e-6  # capped: the target is out of reach
    none, _ = choose_outliers(x, w, absmax, error_target=0.5, max_count=6)
    assert len(none) == 0


def test_custom_op_matches_the_numpy_reference():
    m, w, p = lowered(custom_op=True)
    assert op_types(m) == ["MixedInt8MatMul"] and m.opset_imports["qcompile"] == 1
    assert p.decisions["proj"]["outliers"] == 2 and "w" not in m.graph.initializers
    x = activations(np.random.default_rng(9))
    y = run(m, x)
    expected = reference(x, w, OUTLIERS)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    exact = x.astype(np.float64) @ w
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.02


@pytest.mark.parametrize("integer_to_float, matmul", [(True, "MatMulIntegerToFloat"), (False, "MatMulInteger")])
def test_graph_form_gives_the_custom_ops_numbers(integer_to_float, matmul):
    m, w, _ = lowered(custom_op=False, integer_to_float=integer_to_float)
    ops = op_types(m)
    assert matmul in ops and "Gather" in ops and "MatMul" in ops and "MixedInt8MatMul" not in ops
    assert "qcompile" not in m.opset_imports
    x = activations(np.random.default_rng(9))
    expected = reference(x, w, OUTLIERS)
    y = run(m, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    custom, _, _ = lowered(custom_op=True)
    np.testing.assert_allclose(y, run(custom, x), rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_no_calibration_data_is_a_clear_error():
    m, _ = model()
    with pytest.raises(QCompileError, match="calib"):
        LLMInt8Pass(None, progress=False)(m)


def test_cli_asks_for_calibration_data(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    ir.save(model()[0], path)
    assert cli.main([str(path), "--int8-mixed", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "calib" in capsys.readouterr().err
