"""The LM head (the MatMul producing a graph output) runs as int8 MatMulNBits with activations
quantized per block: checked against numpy and against the per-token lowering."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from passes.blockwise_lm_head import BlockwiseLMHeadPass
from passes.select_targets import TARGET_KEY, SelectTargetsPass, targets
from qcompiler.config import W8A8Config
from qcompiler.packed_weight import WEIGHT_KEY
from qcompiler.pipeline import run_passes, qdq_passes
from tests import graphs
from tests.passes.helpers import run

K, VOCAB = 576, 1024  # K as SmolLM2: ORT runs blocks of 64 input channels


def head_weight(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, (K, VOCAB)).astype(np.float32)


def lm_head_graph(seed: int = 0) -> onnx.ModelProto:
    """x → hidden MatMul → residual Add (a graph output) and x → head MatMul → logits (a
    graph output): only the MatMul whose own output is a graph output is the LM head."""
    rng = np.random.default_rng(seed + 1)
    inits = {"w_hidden": rng.normal(0, 0.1, (K, K)).astype(np.float32), "w_head": head_weight(seed)}
    nodes = [helper.make_node("MatMul", ["x", "w_hidden"], ["h"], name="hidden"),
             helper.make_node("Add", ["x", "h"], ["r"], name="residual"),
             helper.make_node("MatMul", ["x", "w_head"], ["logits"], name="head")]
    return graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
                             [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", VOCAB]),
                              helper.make_tensor_value_info("r", TensorProto.FLOAT, ["B", "S", K])], inits)


def outlier_input(seed: int = 1) -> np.ndarray:
    """Tokens whose first channels are 40× the rest: one scale per token wastes the others."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (1, 16, K)).astype(np.float32)
    x[..., :8] *= 40.0
    return x


def test_the_head_leaves_the_w8a8_targets_with_an_int8_packed_weight():
    model = ir.from_proto(lm_head_graph())
    SelectTargetsPass(("MatMul",))(model)
    BlockwiseLMHeadPass()(model)
    head, hidden = model.graph.node("head"), model.graph.node("hidden")
    assert TARGET_KEY not in head.meta and [t.node.name for t in targets(model)] == ["hidden"]
    packed = head.meta[WEIGHT_KEY]
    assert (packed.bits, packed.group_size, packed.q.dtype) == (8, K, np.int8)
    w = head_weight()
    step = np.abs(w).max(axis=0) / 127  # symmetric int8 per output channel
    assert np.all(np.abs(packed.dequantize() - w) <= step / 2 + 1e-7)
    assert WEIGHT_KEY not in hidden.meta


def _compiled(config: W8A8Config) -> ir.Model:
    model = ir.from_proto(lm_head_graph())
    run_passes(model, qdq_passes(config, feeds=None, progress=False))
    return model


def _relative_error(model: ir.Model, x: np.ndarray) -> float:
    reference = run(lm_head_graph(), {"x": x})[0]
    out = run(model, {"x": x})[0]  # outputs: logits first
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def test_per_token_schemes_run_the_head_block_wise_and_more_accurately():
    blockwise = _compiled(W8A8Config(activations="per-token"))
    per_token = _compiled(W8A8Config(activations="per-token", blockwise_lm_head=False))
    heads = [n for n in blockwise.graph if n.op_type == "MatMulNBits"]
    assert len(heads) == 1 and heads[0].attributes.get_int("accuracy_level") == 4
    assert heads[0].attributes.get_int("bits") == 8
    assert not any(n.op_type == "MatMulNBits" for n in per_token.graph)
    x = outlier_input()
    e_block, e_token = _relative_error(blockwise, x), _relative_error(per_token, x)
    assert e_block < 0.05
    assert e_block < 0.7 * e_token, (e_block, e_token)


def test_static_activations_keep_the_head_in_the_integer_lowering():
    assert not W8A8Config(activations="static").lm_head_blockwise
    assert not W8A8Config(activations="per-token", blockwise_lm_head=False).lm_head_blockwise
    assert W8A8Config(activations="per-token-sym").lm_head_blockwise
