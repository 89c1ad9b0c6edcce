import resource
import time

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from passes.select_targets import find_target
from qcompiler import ir_utils
from qcompiler.calibration import run_once
from qcompiler.errors import QCompileError
from qcompiler.sequential import Stage, run_stages, stages_by_activation
from tests import graphs
from tests.passes.helpers import to_ir

D, F, V = 8, 12, 20
OPS = ("MatMul", "Gemm")


def tower(replaced: dict[str, np.ndarray] | None = None):
    """ids → Gather(E) → x0 → ×g → q, k (one stage) → q·σ(k) → o → r1 = x0 + o
    → Reshape [B·S, D] → Gemm (transB) → Relu → Reshape [B, S, F] → down
    → r2 = r1 + down + x0 (x0 crosses four cuts) → × mask
    → LM head MatMul(·, Transpose(E)), tied to the Gather's table.

    ``replaced``: arrays for weights (by name; ``et`` is the head's Transpose(E), then read
    from an initializer and E stays the Gather's) — the model with those weights swapped in."""
    rng = np.random.default_rng(0)
    inits = {
        "E": rng.normal(0, 1, (V, D)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, D).astype(np.float32),
        "wq": rng.normal(0, 0.4, (D, D)).astype(np.float32),
        "wk": rng.normal(0, 0.4, (D, D)).astype(np.float32),
        "wo": rng.normal(0, 0.4, (D, D)).astype(np.float32),
        "wg": rng.normal(0, 0.4, (F, D)).astype(np.float32),
        "bg": rng.normal(0, 0.1, F).astype(np.float32),
        "wd": rng.normal(0, 0.4, (F, D)).astype(np.float32),
        "f": np.array([F], np.int64),
        "last": np.array([-1], np.int64),
    }
    replaced = replaced or {}
    inits.update({k: v for k, v in replaced.items() if k != "et"})
    head = []
    if "et" in replaced:
        inits["et"] = replaced["et"]
    else:
        head = [helper.make_node("Transpose", ["E"], ["et"], perm=[1, 0], name="tie")]
    flat = numpy_helper.from_array(np.array([-1, D], np.int64))
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x0"], name="embed"),
        *head,  # early in the list, read only by the last stage
        helper.make_node("Shape", ["ids"], ["bs"], name="shape"),  # read three cuts later
        helper.make_node("Constant", [], ["flat"], value=flat, name="flat_const"),
        helper.make_node("Mul", ["x0", "g"], ["h0"], name="norm"),
        helper.make_node("MatMul", ["h0", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h0", "wk"], ["k"], name="k_proj"),
        helper.make_node("Sigmoid", ["k"], ["sk"], name="sigmoid"),
        helper.make_node("Mul", ["q", "sk"], ["a"], name="gate"),
        helper.make_node("MatMul", ["a", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["x0", "o"], ["r1"], name="residual1"),
        helper.make_node("Reshape", ["r1", "flat"], ["r1_flat"], name="flatten"),
        helper.make_node("Gemm", ["r1_flat", "wg", "bg"], ["gm"], transB=1, name="up_proj"),
        helper.make_node("Relu", ["gm"], ["gr"], name="relu"),
        helper.make_node("Concat", ["bs", "f"], ["shp"], axis=0, name="up_shape"),
        helper.make_node("Reshape", ["gr", "shp"], ["u"], name="unflatten"),
        helper.make_node("MatMul", ["u", "wd"], ["d"], name="down_proj"),
        helper.make_node("Add", ["r1", "d"], ["r2a"], name="residual2"),
        helper.make_node("Add", ["r2a", "x0"], ["r2"], name="residual0"),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT, name="mask_float"),
        helper.make_node("Unsqueeze", ["mf", "last"], ["mu"], name="mask_unsqueeze"),
        helper.make_node("Mul", ["r2", "mu"], ["y"], name="mask_mul"),
        helper.make_node("MatMul", ["y", "et"], ["logits"], name="lm_head"),
    ]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", V])],
        inits,
    )


def tower_stages(model: ir.Model) -> list[Stage]:
    return stages_by_activation(n for n in model.graph if find_target(n, OPS))


def make_feeds(lengths=(5, 3, 7), batch=2, pad=0, seed=1) -> list[dict]:
    rng = np.random.default_rng(seed)
    feeds = []
    for s in lengths:
        mask = np.ones((batch, s), np.int64)
        if pad:
            mask[-1, s - min(pad, s - 1):] = 0  # right padding on the last row
        feeds.append({"ids": rng.integers(0, V, (batch, s)).astype(np.int64), "attention_mask": mask})
    return feeds


class Recorder:
    """A quantize callback that records each call and returns ``update(stage)``'s weights."""

    def __init__(self, update=None):
        self.update = update or (lambda stage: None)
        self.calls: list[tuple[int, Stage, list[np.ndarray]]] = []

    def __call__(self, index, stage, batches):
        self.calls.append((index, stage, batches))
        return self.update(stage)

    def batches(self) -> dict[str, list[np.ndarray]]:
        return {stage.activation.name: batches for _, stage, batches in self.calls}


def float_rows(model: ir.Model, value: ir.Value, feed: dict) -> np.ndarray:
    x = run_once(model, [value], feed)[value.name]
    return x.reshape(-1, x.shape[-1])


def test_stages_group_layers_that_share_an_activation():
    model = to_ir(tower())
    stages = tower_stages(model)
    assert [(s.activation.name, [w.name for w in s.weights]) for s in stages] == [
        ("h0", ["wq", "wk"]), ("a", ["wo"]), ("r1_flat", ["wg"]), ("u", ["wd"]), ("y", ["et"])]


def test_without_new_weights_every_stage_sees_the_float_activations():
    model = to_ir(tower())
    stages, feeds, recorder = tower_stages(model), make_feeds(), Recorder()
    summary = run_stages(model, stages, feeds, recorder, mask_padding=False, progress=False)
    assert [index for index, _, _ in recorder.calls] == [0, 1, 2, 3, 4]
    assert [stage for _, stage, _ in recorder.calls] == stages
    assert summary.segments == 5  # the tail (the head MatMul) never runs
    for _, stage, batches in recorder.calls:
        assert len(batches) == len(feeds)
        for feed, rows in zip(feeds, batches):
            np.testing.assert_allclose(rows, float_rows(model, stage.activation, feed), rtol=1e-5, atol=1e-6)
    hidden = sum(f["ids"].size for f in feeds) * F * 4  # one [B, S, F] float tensor per feed
    assert 0 < summary.peak_live_bytes < 4 * hidden  # a few hidden states, not the whole model's


def test_stages_in_any_order_run_in_graph_order():
    model = to_ir(tower())
    stages, feeds = tower_stages(model), make_feeds(lengths=(4,))
    forward, backward = Recorder(), Recorder()
    run_stages(model, stages, feeds, forward, progress=False)
    run_stages(model, stages[::-1], feeds, backward, progress=False)
    assert [index for index, _, _ in backward.calls] == [4, 3, 2, 1, 0]
    for (_, a, xs), (_, b, ys) in zip(forward.calls, backward.calls):
        assert a is b
        np.testing.assert_array_equal(xs[0], ys[0])


def scaled(stage: Stage, only_first: bool = False) -> dict[str, np.ndarray]:
    weights = stage.weights[:1] if only_first else stage.weights
    return {w.name: ir_utils.constant_through_views(w) * 0.5 + 0.1 for w in weights}


@pytest.mark.parametrize("only_first", [False, True], ids=["all", "first-of-each-stage"])
def test_returned_weights_feed_the_later_stages(only_first):
    model = to_ir(tower())
    stages, feeds = tower_stages(model), make_feeds()
    recorder = Recorder(lambda stage: scaled(stage, only_first))
    run_stages(model, stages, feeds, recorder, mask_padding=False, progress=False)
    replaced = {name: w for stage in stages for name, w in scaled(stage, only_first).items()}
    assert ("wk" in replaced) != only_first
    reference = to_ir(tower(replaced))  # a stage's activation depends on earlier stages' weights only
    values = {v.name: v for node in reference.graph for v in node.outputs}
    changed = 0
    for _, stage, batches in recorder.calls:
        for feed, rows in zip(feeds, batches):
            expected = float_rows(reference, values[stage.activation.name], feed)
            np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5)
            changed += not np.allclose(rows, float_rows(model, stage.activation, feed), atol=1e-3)
    assert changed == 4 * len(feeds)  # every stage after the first sees new inputs


def test_padded_positions_are_dropped():
    model = to_ir(tower())
    stages, feeds = tower_stages(model), make_feeds(lengths=(6, 4), pad=2)
    recorder = Recorder()
    run_stages(model, stages, feeds, recorder, progress=False)
    for _, stage, batches in recorder.calls:
        for feed, rows in zip(feeds, batches):
            keep = feed["attention_mask"].reshape(-1) != 0
            assert rows.shape[0] == keep.sum() < keep.size
            expected = float_rows(model, stage.activation, feed)[keep]
            np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)


def test_the_model_is_left_unchanged():
    model = to_ir(tower())
    before = ir.to_proto(model).SerializeToString()
    nodes, outputs = list(model.graph), list(model.graph.outputs)
    stages = tower_stages(model)
    run_stages(model, stages, make_feeds(), Recorder(lambda stage: scaled(stage)), progress=False)
    assert list(model.graph) == nodes and list(model.graph.outputs) == outputs
    assert ir.to_proto(model).SerializeToString() == before


def if_model():
    """x → h = Relu(x)·w1 → If(c): then x + h, else x − h (x read from the branches only) → ·w2."""
    rng = np.random.default_rng(0)
    branch = {}
    for name, op in (("then", "Add"), ("else", "Sub")):
        branch[name] = helper.make_graph(
            [helper.make_node(op, ["x", "h"], [f"{name}_out"])], name, [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["B", D])])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w1"], ["h"], name="fc1"),
        helper.make_node("If", ["c"], ["z"], then_branch=branch["then"], else_branch=branch["else"],
                         name="if"),
        helper.make_node("MatMul", ["z", "w2"], ["y"], name="fc2"),
    ]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", D]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", D])],
        {name: rng.normal(0, 0.4, (D, D)).astype(np.float32) for name in ("w1", "w2")},
    )


@pytest.mark.parametrize("cond", [True, False])
def test_subgraph_outer_reads_are_carried(cond):
    model = to_ir(if_model())
    stages = tower_stages(model)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.normal(size=(3, D)).astype(np.float32), "c": np.array(cond)} for _ in range(2)]
    recorder = Recorder()
    run_stages(model, stages, feeds, recorder, progress=False)
    _, stage, batches = recorder.calls[-1]
    assert stage.activation.name == "z"
    for feed, rows in zip(feeds, batches):
        np.testing.assert_allclose(rows, float_rows(model, stage.activation, feed), rtol=1e-6)


@pytest.mark.parametrize("update, message", [
    (lambda stage: {"nope": np.zeros(1)}, "returned 'nope'"),
    (lambda stage: {stage.weights[0].name: np.zeros((2, 2))}, "shaped"),
])
def test_bad_returned_weights_are_refused(update, message):
    model = to_ir(tower())
    with pytest.raises(QCompileError, match=message):
        run_stages(model, tower_stages(model), make_feeds(), Recorder(update), progress=False)


def test_bad_stages_are_refused():
    model = to_ir(tower())
    node = model.graph.node("q_proj")
    with pytest.raises(QCompileError, match="not a constant"):
        run_stages(model, [Stage(node.inputs[1], [node.inputs[0]])], make_feeds(), Recorder(), progress=False)
    with pytest.raises(QCompileError, match="computed after"):  # o_proj's input is q·σ(k), read by q_proj
        run_stages(model, [Stage(model.graph.node("o_proj").inputs[0], [node.inputs[1]])], make_feeds(),
                   Recorder(), progress=False)
    with pytest.raises(QCompileError, match="no samples"):
        run_stages(model, tower_stages(model), [], Recorder(), progress=False)


SMOLLM2 = models.DEFAULT_CACHE / "smollm2" / "model.onnx"


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="no cached SmolLM2 export")
def test_smollm2_first_and_last_stage_see_the_float_activations():
    import models.data

    model = ir_utils.load_model(SMOLLM2)
    stages = tower_stages(model)
    assert len(stages) == 121  # 30 × (qkv, o, gate/up, down) + the tied LM head
    feeds = models.data.model_feeds("smollm2", "calib", 2)
    recorder = Recorder()
    start = time.perf_counter()
    summary = run_stages(model, stages, feeds, recorder, progress=False)
    print(f"\n{len(feeds)} windows: {time.perf_counter() - start:.1f}s, {summary}, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    for index in (0, len(stages) - 1):
        _, stage, batches = recorder.calls[index]
        for feed, rows in zip(feeds, batches):
            expected = float_rows(model, stage.activation, feed)
            assert rows.shape == expected.shape == (512, 576)
            assert np.abs(rows - expected).max() <= 1e-4 * np.abs(expected).max()


def test_an_unsorted_graph_is_refused_with_the_value_read_too_early():
    unsorted = to_ir(tower())
    node = unsorted.graph.node("embed")  # its output is now read before it is computed
    unsorted.graph.remove(node)
    unsorted.graph.append(node)
    with pytest.raises(QCompileError, match="before it is computed: sort the graph first"):
        run_stages(unsorted, tower_stages(unsorted), make_feeds(), Recorder(), progress=False)
