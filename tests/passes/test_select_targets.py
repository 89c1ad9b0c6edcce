import numpy as np

from passes.select_targets import SelectTargetsPass, TARGET_KEY, targets
from tests import graphs
from tests.passes.helpers import to_ir

OPS = ("MatMul", "Gemm", "Conv")


def test_selects_matmuls_with_constant_weights_even_through_a_transpose():
    model = to_ir(graphs.mlp())
    assert SelectTargetsPass(OPS)(model).modified
    found = {t.node.name: t for t in targets(model)}
    assert set(found) == {"fc1", "fc2"}
    w2t = model.graph.initializers["w2t"].const_value.numpy()
    np.testing.assert_array_equal(found["fc2"].weight, w2t.T)  # the weight as the MatMul sees it
    assert found["fc2"].channel_axis == 1


def test_second_run_changes_nothing():
    model = to_ir(graphs.mlp())
    SelectTargetsPass(OPS)(model)
    assert not SelectTargetsPass(OPS)(model).modified


def test_activation_times_activation_is_not_a_target():
    model = to_ir(graphs.attention_scores())
    assert not SelectTargetsPass(OPS)(model).modified
    assert targets(model) == []


def test_gemm_axis_follows_transB_and_conv_uses_axis_0():
    for trans_b, axis in ((1, 0), (0, 1)):
        model = to_ir(graphs.gemm(trans_b=trans_b))
        SelectTargetsPass(OPS)(model)
        assert [t.channel_axis for t in targets(model)] == [axis]
    model = to_ir(graphs.conv())
    SelectTargetsPass(OPS)(model)
    assert [t.channel_axis for t in targets(model)] == [0]


def test_excluded_nodes_and_op_types_stay_float():
    model = to_ir(graphs.mlp())
    SelectTargetsPass(OPS, exclude=("fc2",))(model)
    assert [t.node.name for t in targets(model)] == ["fc1"]
    model = to_ir(graphs.conv())
    assert not SelectTargetsPass(("MatMul",))(model).modified
    assert all(TARGET_KEY not in n.meta for n in model.graph)
