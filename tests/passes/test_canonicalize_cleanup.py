import numpy as np
from onnx import TensorProto, helper

from passes.canonicalize import CanonicalizePass
from passes.cleanup import CleanupPass
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir


def _messy():
    """A Constant-node weight, an Identity, a dead branch, nodes out of order."""
    w = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)  # ≥ 16 elements: lifted
    nodes = [
        helper.make_node("MatMul", ["xi", "w"], ["y"], name="mm"),
        helper.make_node("Identity", ["x"], ["xi"], name="id"),
        helper.make_node("Constant", [], ["w"], value=helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())),
        helper.make_node("Relu", ["x"], ["dead"], name="dead"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what ONNX Runtime 1.31 reads
    return model, w


def test_canonicalize_lifts_constants_drops_identity_and_dead_nodes_and_sorts():
    proto, w = _messy()
    model = to_ir(proto)
    assert CanonicalizePass()(model).modified
    check(model)
    assert op_types(model) == ["MatMul"]
    matmul = next(iter(model.graph))
    assert matmul.inputs[1].is_initializer() and matmul.inputs[0].name == "x"
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], x @ w, rtol=1e-6)
    assert not CanonicalizePass()(model).modified


def test_cleanup_removes_unused_initializers_and_is_idempotent():
    import onnx_ir as ir

    model = to_ir(graphs.mlp())
    fc2 = next(n for n in model.graph if n.name == "fc2")
    w2 = model.graph.initializers["w2t"].const_value.numpy().T.copy()
    replacement = ir.val("w2", const_value=ir.tensor(w2))
    model.graph.register_initializer(replacement)
    fc2.replace_input_with(1, replacement)  # the Transpose and w2t are now unused
    assert CleanupPass()(model).modified
    check(model)
    assert "Transpose" not in op_types(model) and "w2t" not in model.graph.initializers
    assert not CleanupPass()(model).modified
