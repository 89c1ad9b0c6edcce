"""FloatReferencePass: the float model's first output on the held samples, taken once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from passes.float_reference import FloatReferencePass
from runtime.session import create_session
from test_keep_sensitive_float import _samples, mlp


def test_keeps_the_float_outputs_once_and_changes_nothing(tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    feeds, reads = _samples(5), []

    def source():
        reads.append(1)
        return iter(feeds)

    model = ir.load(str(src))
    before = ir.to_proto(model).SerializeToString()
    reference = FloatReferencePass(source, samples=3)
    assert not reference(model).modified and not reference(model).modified
    assert len(reads) == 1 and ir.to_proto(model).SerializeToString() == before
    session = create_session(str(src))
    assert len(reference.outputs) == 3 and [f["x"] for f in reference.inputs] == [f["x"] for f in feeds[:3]]
    for feed, got in zip(feeds[:3], reference.outputs):
        np.testing.assert_array_equal(got, session.run(None, feed)[0])
