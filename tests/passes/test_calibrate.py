import numpy as np
from onnx import numpy_helper

from passes.calibrate import STATS_KEY, CalibratePass
from passes.select_targets import SelectTargetsPass, targets
from qcompiler.calibration import valid_positions
from tests import graphs
from tests.passes.helpers import to_ir

OPS = ("MatMul", "Gemm", "Conv")


def test_statistics_equal_numpy_on_the_intermediate_activation():
    proto = graphs.mlp()
    w1 = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w1"))
    model = to_ir(proto)
    SelectTargetsPass(OPS)(model)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(1, 4, 32)).astype(np.float32) for _ in range(5)]
    result = CalibratePass(lambda: ({"x": x} for x in xs), progress=False)(model)
    assert not result.modified  # observing changes no node
    by_node = {t.node.name: t.activation.meta[STATS_KEY] for t in targets(model)}
    relu = np.concatenate([np.maximum(x @ w1, 0) for x in xs])
    assert by_node["fc2"].max == relu.max() and by_node["fc2"].min == 0.0
    assert by_node["fc1"].count == sum(x.size for x in xs)  # a graph input, read from the feed
    np.testing.assert_allclose(by_node["fc2"].channel_absmax, relu.reshape(-1, relu.shape[-1]).max(0), rtol=1e-6)


def test_padded_positions_are_left_out():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    kept = valid_positions(x, mask)
    np.testing.assert_array_equal(kept, np.concatenate([x[0, :2], x[1, :1]]))
    np.testing.assert_array_equal(valid_positions(x.reshape(6, 4), mask), kept)  # [batch·seq, K]
    assert valid_positions(x, None) is x


def test_nothing_left_to_observe_runs_nothing():
    model = to_ir(graphs.mlp())
    SelectTargetsPass(OPS)(model)
    for t in targets(model):
        t.activation.meta[STATS_KEY] = object()

    def no_feeds():
        raise AssertionError("calibration data read although all statistics exist")

    CalibratePass(no_feeds, progress=False)(model)
