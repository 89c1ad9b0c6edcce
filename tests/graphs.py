"""Tiny models for unit tests, built with onnx.helper (independent of the code under test)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


def make_model(nodes, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tiny", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(k: int = 32, n: int = 48, seed: int = 0, tied_transpose: bool = False) -> onnx.ModelProto:
    """x[B,S,K] → MatMul(W1) → Relu → Gemm-like MatMul(W2 through a Transpose) → y, plus a
    residual Add reading x (must stay float)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (k, n)).astype(np.float32)
    w2t = rng.normal(0, 0.2, (k, n)).astype(np.float32)  # stored [K, N], used transposed: [N, K]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Transpose", ["w2t"], ["w2"], perm=[1, 0], name="tie"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", k])],
        {"w1": w1, "w2t": w2t},
    )


def gemm(k: int = 16, n: int = 8, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.normal(0, 0.1, (n,)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=trans_b, alpha=alpha, beta=beta, name="gemm")]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
        {"w": w, "c": c},
    )


def conv(c_in: int = 3, c_out: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (c_out, c_in, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (c_out,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c_in, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", c_out, 8, 8])],
        {"w": w, "b": b},
    )


def attention_scores(seq: int = 4, d: int = 8):
    """Q·Kᵀ: an activation×activation MatMul that must not be a target."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["y"], name="scores"),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", seq, d]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", seq, d]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", seq, seq])],
        {},
    )
