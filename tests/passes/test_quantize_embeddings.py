import numpy as np
from onnx import TensorProto, helper

from passes.cleanup import CleanupPass
from passes.quantize_embeddings import QuantizeEmbeddingsPass
from passes.quantize_weights import quantize_weight
from tests import graphs
from tests.passes.helpers import check, op_types, run, to_ir


def _embedding_model(vocab=300, dim=16, tied=False, seed=0):
    """ids → Gather(table) → (optionally) MatMul(·, Transpose(table)): a tied LM head."""
    table = np.random.default_rng(seed).normal(size=(vocab, dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed")]
    out, shape = "h", ["B", "S", dim]
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
        out, shape = "logits", ["B", "S", vocab]
    proto = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
        {"table": table},
    )
    return proto, table


def test_rows_equal_numpy_per_row_dequantization():
    proto, table = _embedding_model()
    model = to_ir(proto)
    assert QuantizeEmbeddingsPass(min_bytes=0)(model).modified
    CleanupPass()(model)
    check(model)
    assert "table" not in model.graph.initializers  # the float table is gone
    ids = np.array([[0, 5, 299, 5]], np.int64)
    expected = quantize_weight(table, channel_axis=0).dequantize()[ids]
    np.testing.assert_allclose(run(model, {"ids": ids})[0], expected, rtol=1e-6)
    assert model.graph.outputs[0].name == "h"


def test_tied_table_keeps_float_for_its_other_reader_and_second_run_is_a_no_op():
    proto, table = _embedding_model(tied=True)
    model = to_ir(proto)
    QuantizeEmbeddingsPass(min_bytes=0)(model)
    CleanupPass()(model)
    check(model)
    assert "table" in model.graph.initializers and "Transpose" in op_types(model)
    ids = np.array([[3, 7]], np.int64)
    h = quantize_weight(table, channel_axis=0).dequantize()[ids]
    np.testing.assert_allclose(run(model, {"ids": ids})[0], h @ table.T, rtol=1e-5, atol=1e-5)
    assert not QuantizeEmbeddingsPass(min_bytes=0)(model).modified


def test_small_tables_and_other_gathers_are_left_alone():
    proto, _ = _embedding_model(vocab=8, dim=4)
    model = to_ir(proto)
    assert not QuantizeEmbeddingsPass()(model).modified  # 128 bytes < 1 MB
    gather_axis1 = graphs.make_model(
        [helper.make_node("Gather", ["table", "ids"], ["h"], axis=1)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [4, 2])],
        {"table": np.ones((4, 4), np.float32)},
    )
    assert not QuantizeEmbeddingsPass(min_bytes=0)(to_ir(gather_axis1)).modified
