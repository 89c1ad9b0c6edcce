import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from passes.activation_points import is_global_pool, is_residual_add, points
from passes.select_targets import SelectTargetsPass
from tests import graphs
from tests.passes.helpers import to_ir

OPS = ("MatMul", "Gemm", "Conv")
CNN_POINTS = [
    ("conv1", 0, "weighted op"),
    ("conv2", 0, "weighted op"),
    ("residual", 0, "residual add"),
    ("residual", 1, "residual add"),
    ("pool", 0, "pooling"),
    ("fc", 0, "weighted op"),
]


def _annotated(proto):
    model = to_ir(proto)
    SelectTargetsPass(OPS)(model)
    return model


def _points(model, placement):
    return [(p.node.name, p.index, p.rule) for p in points(model, placement)]


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


@pytest.mark.parametrize("placement", ["fusable", "all"])
@pytest.mark.parametrize("pool", ["GlobalAveragePool", "ReduceMean"])
def test_cnn_head_residual_add_and_pooling_are_points(placement, pool):
    model = _annotated(graphs.residual_cnn(pool=pool, axes=(2, 3)))
    assert _points(model, placement) == CNN_POINTS
    assert points(model, placement)[2].value.name == "c2"  # Point.value is the read input


@pytest.mark.parametrize("axes, keepdims", [((1,), 1), ((2, 3), 0)])
def test_reduce_mean_that_is_not_global_pooling_is_never_a_point(axes, keepdims):
    model = _annotated(graphs.residual_cnn(pool="ReduceMean", axes=axes, keepdims=keepdims))
    assert not is_global_pool(_node(model, "pool"))
    weighted = [("conv1", 0, "weighted op"), ("conv2", 0, "weighted op"), ("fc", 0, "weighted op")]
    assert _points(model, "fusable") == weighted
    # "all" keeps the residual add (every residual add), still no pooling point
    assert _points(model, "all") == weighted[:2] + [
        ("residual", 0, "residual add"),
        ("residual", 1, "residual add"),
    ] + weighted[2:]


def test_pooling_read_by_a_float_op_is_not_a_point():
    model = _annotated(graphs.residual_cnn(head="Softmax"))
    assert is_global_pool(_node(model, "pool"))
    assert _points(model, "fusable") == [("conv1", 0, "weighted op"), ("conv2", 0, "weighted op")]
    assert _points(model, "all") == [
        ("conv1", 0, "weighted op"),
        ("conv2", 0, "weighted op"),
        ("residual", 0, "residual add"),
        ("residual", 1, "residual add"),
    ]


def test_residual_stream_into_layernorm_is_a_point_only_under_all():
    model = _annotated(graphs.residual_layernorm())
    assert is_residual_add(_node(model, "residual"))  # MatMul → Add(bias) → Add(x)
    assert _points(model, "fusable") == [("fc1", 0, "weighted op"), ("fc2", 0, "weighted op")]
    assert _points(model, "all") == [
        ("fc1", 0, "weighted op"),
        ("residual", 0, "residual add"),
        ("residual", 1, "residual add"),
        ("fc2", 0, "weighted op"),
    ]


def test_attention_mask_add_is_never_a_residual_add():
    model = _annotated(graphs.residual_layernorm())
    assert not is_residual_add(_node(model, "mask_add"))  # scores (act × act) + mask input
    assert not is_residual_add(_node(model, "bias1"))  # activation + constant
    for placement in ("fusable", "all"):
        assert all(p.node.name not in ("mask_add", "bias1", "scores") for p in points(model, placement))


def test_chained_residual_adds_qualify_together():
    # x → conv1 → s1 = conv1 + x → conv2 → s2 = conv2 + s1 → GlobalAveragePool → Flatten → Gemm:
    # s1 is read by conv2 (a point) and by the second add (a candidate): both adds qualify.
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32),
        "w2": rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32),
        "wf": rng.normal(0, 0.3, (3, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Add", ["c1", "x"], ["s1"], name="add1"),
        helper.make_node("Conv", ["s1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["s1", "c2"], ["s2"], name="add2"),
        helper.make_node("GlobalAveragePool", ["s2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1, name="fc"),
    ]
    proto = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
        opset=graphs.QDQ_OPSET,
    )
    model = _annotated(proto)
    expected = [
        ("conv1", 0, "weighted op"),
        ("add1", 0, "residual add"),
        ("add1", 1, "residual add"),
        ("conv2", 0, "weighted op"),
        ("add2", 0, "residual add"),
        ("add2", 1, "residual add"),
        ("pool", 0, "pooling"),
        ("fc", 0, "weighted op"),
    ]
    assert _points(model, "fusable") == expected == _points(model, "all")


def _reduce_mean(shape, axes, keepdims=1, axes_as_attribute=False):
    """One ReduceMean on an input of ``shape`` (None: unknown rank); opset 13 for the attribute."""
    if axes_as_attribute:
        node = helper.make_node("ReduceMean", ["x"], ["y"], axes=list(axes), keepdims=keepdims)
        inits, opset = {}, 13
    else:
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)
        inits, opset = {"axes": np.array(axes, np.int64)}, graphs.QDQ_OPSET
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    model = to_ir(proto)
    return next(iter(model.graph))


@pytest.mark.parametrize(
    "shape, axes, keepdims, attribute, expected",
    [
        ([1, 4, 6, 6], (2, 3), 1, False, True),
        ([1, 4, 6, 6], (3, 2), 1, False, True),
        ([1, 4, 6, 6], (-2, -1), 1, False, True),
        ([1, 4, 6, 6], (2, 3), 1, True, True),  # opset-13 form, axes as an attribute
        ([1, 4, 6, 6], (1,), 1, False, False),
        ([1, 4, 6, 6], (2, 3), 0, False, False),
        ([1, 4, 6, 6], (1, 2, 3), 1, False, False),
        ([4, 6, 6], (1, 2), 1, False, False),  # not NCHW
        (None, (2, 3), 1, False, False),  # rank unknown
    ],
)
def test_is_global_pool_for_reduce_mean(shape, axes, keepdims, attribute, expected):
    assert is_global_pool(_reduce_mean(shape, axes, keepdims, attribute)) is expected


def test_unknown_placement_is_an_error():
    with pytest.raises(ValueError, match="unknown placement"):
        points(_annotated(graphs.residual_cnn()), "everywhere")


def test_bias_first_add_before_a_residual_add_is_recognized():
    # fc1 → Add(b1, ·) → Add(·, x) → fc2: the same block as Add(·, b1), operands swapped
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["b1", "m1"], ["a1"], name="bias1"),
        helper.make_node("Add", ["a1", "x"], ["h"], name="residual"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
    ]
    proto = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        {n: rng.normal(size=s).astype(np.float32) for n, s in (("w1", (8, 8)), ("b1", (8,)), ("w2", (8, 8)))},
        opset=graphs.QDQ_OPSET,
    )
    model = _annotated(proto)
    assert is_residual_add(_node(model, "residual"))
    assert ("residual", 0, "residual add") in _points(model, "fusable")
