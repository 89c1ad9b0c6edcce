import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qcompiler import ir_utils
from qcompiler.errors import QCompileError
from tests import graphs


def test_save_with_external_data_round_trips(tmp_path):
    model = ir.from_proto(graphs.mlp())
    out = ir_utils.save_model(model, tmp_path / "m.onnx", external_threshold=0)
    assert (tmp_path / "m.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # nothing staged left
    reloaded = ir_utils.load_model(out)
    w1 = reloaded.graph.initializers["w1"].const_value.numpy()
    np.testing.assert_array_equal(w1, model.graph.initializers["w1"].const_value.numpy())
    onnx.checker.check_model(str(out), full_check=True)


def test_small_models_are_one_file(tmp_path):
    ir_utils.save_model(ir.from_proto(graphs.mlp()), tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x12\x34garbage", "cannot read")])
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(QCompileError, match=message):
        ir_utils.load_model(path)


def test_load_rejects_old_opsets(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(_opset_11(), path)
    with pytest.raises(QCompileError, match="opset 11"):
        ir_utils.load_model(path)


def _opset_11():
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_constant_through_views_applies_transpose_and_reshape():
    from onnx import TensorProto, helper

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    proto = graphs.make_model(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         helper.make_node("Reshape", ["wt", "shape"], ["wr"]),
         helper.make_node("MatMul", ["x", "wr"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        {"w": w, "shape": np.array([4, 3], np.int64)},
    )
    model = ir.from_proto(proto)
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    np.testing.assert_array_equal(ir_utils.constant_through_views(matmul.inputs[1]), w.T.reshape(4, 3))
    assert ir_utils.constant_through_views(matmul.inputs[0]) is None  # a graph input
