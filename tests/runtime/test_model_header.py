"""runtime.model_header reads opset domains and metadata, as onnx.load does, without the graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.model_header import read_header


def test_header_matches_the_parsed_model(tmp_path):
    big = numpy_helper.from_array(np.arange(300_000, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300_000])], [big])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("qcompile", 1)])
    onnx.helper.set_model_props(model, {"qcompile.float8_qdq": "1", "other": "x"})
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (path, path.read_bytes()):
        header = read_header(source)
        assert header.domains == {"", "qcompile"}
        assert header.metadata == {"qcompile.float8_qdq": "1", "other": "x"}
    assert read_header(b"").domains == set()
