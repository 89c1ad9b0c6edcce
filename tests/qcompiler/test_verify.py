"""--verify: the op-by-op check catches a lowering that moves outputs, and passes a correct one."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qcompiler import ir_utils, pipeline, verify
from qcompiler.config import W8A8Config
from onnx import TensorProto, helper
from tests import graphs


def conv_chain() -> onnx.ModelProto:
    """Conv → Relu → Conv: the first conv's output is requantized for the second."""
    rng = np.random.default_rng(0)
    init = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, (8,)).astype(np.float32),
        "w2": rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, 8, 8])],
        init,
    )


def _feeds(n=4):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


@pytest.fixture()
def compiled(tmp_path):
    """(float path, QDQ bytes, lowered path) of a tiny conv model compiled static for ort-cpu."""
    float_path = tmp_path / "conv.onnx"
    onnx.save(conv_chain(), float_path)
    model = ir_utils.load_model(float_path)
    config = W8A8Config(activations="static")
    feeds = _feeds()
    pipeline.run_passes(model, pipeline.qdq_passes(config, lambda: feeds, progress=False))
    qdq = verify.snapshot(model)
    pipeline.run_passes(model, pipeline.lowering_passes(config))
    lowered = tmp_path / "conv.lowered.onnx"
    ir_utils.save_model(model, lowered)
    return float_path, qdq, lowered


def test_correct_lowering_is_within_one_step(compiled):
    float_path, qdq, lowered = compiled
    result = verify.check(float_path, qdq, lowered, _feeds())
    assert result.ok and [(c.op_type, c.count, c.unchecked) for c in result.ops] == [("QLinearConv", 1, 0)]
    assert result.outputs[0].lowered_sqnr_db > 20
    verify.require(result)  # does not raise


def test_a_wrong_requantization_scale_is_caught(compiled, tmp_path):
    float_path, qdq, lowered = compiled
    proto = onnx.load(lowered)
    node = next(n for n in proto.graph.node if n.op_type == "QLinearConv")
    init = next(i for i in proto.graph.initializer if i.name == node.input[6])  # y_scale
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.05, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, broken)
    result = verify.check(float_path, qdq, broken, _feeds())
    assert not result.ok
    with pytest.raises(verify.VerificationError, match="QLinearConv max"):
        verify.require(result)


def test_without_a_qdq_stage_only_end_to_end_figures(compiled):
    float_path, _, lowered = compiled
    result = verify.check(float_path, None, lowered, _feeds(2))
    assert result.ops == [] and result.ok and len(result.outputs) == 1
