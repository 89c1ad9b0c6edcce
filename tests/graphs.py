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


# --- builders for placement, Q/DQ clean-up and integer-kernel tests (opset 20) ----------------

QDQ_OPSET = 20


def residual_cnn(pool: str = "GlobalAveragePool", axes=(2, 3), keepdims: int = 1, head: str = "Gemm",
                 c: int = 4, classes: int = 5, seed: int = 0) -> onnx.ModelProto:
    """x[1,C,6,6] → conv1 → Relu → conv2 → Add(x) → pool → Flatten → head; shapes inferred.

    ``pool``: ``GlobalAveragePool`` or ``ReduceMean`` (``axes``, ``keepdims``). ``head``: ``Gemm``
    (a target) or ``Softmax`` (a float reader)."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, (c,)).astype(np.float32),
        "w2": rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, (c,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "x"], ["s"], name="residual"),
    ]
    if pool == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"))
    else:
        inits["axes"] = np.array(axes, np.int64)
        nodes.append(helper.make_node("ReduceMean", ["s", "axes"], ["p"], keepdims=keepdims, name="pool"))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"], name="flatten"))
    if head == "Gemm":
        features = c if pool == "GlobalAveragePool" else np.zeros((1, c, 6, 6)).mean(tuple(axes)).size
        inits["wf"] = rng.normal(0, 0.3, (classes, features)).astype(np.float32)
        inits["bf"] = rng.normal(0, 0.1, (classes,)).astype(np.float32)
        nodes.append(helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"))
    else:
        nodes.append(helper.make_node("Softmax", ["f"], ["y"], name="softmax"))
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes if head == "Gemm" else c])],
        inits,
        opset=QDQ_OPSET,
    )
    return onnx.shape_inference.infer_shapes(model)


def residual_layernorm(d: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Transformer-style: h = x + (x·W1 + b1) feeds a float LayerNormalization, then fc2; and an
    attention-mask Add of the scores q·kᵀ (activation × activation) and a mask input."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.normal(0, 0.3, (d, d)).astype(np.float32),
        "b1": rng.normal(0, 0.1, (d,)).astype(np.float32),
        "w2": rng.normal(0, 0.3, (d, d)).astype(np.float32),
        "gamma": np.ones(d, np.float32),
        "beta": np.zeros(d, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="bias1"),
        helper.make_node("Add", ["a1", "x"], ["h"], name="residual"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["x", "kt"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, d]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 4, d]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 4, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, d]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 4, 4]),
        ],
        inits,
        opset=QDQ_OPSET,
    )


def symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8 along ``axis`` (numpy reference): (W^q, scale)."""
    other = tuple(a for a in range(w.ndim) if a != axis)
    scale = (np.abs(w).max(axis=other) / np.float32(127)).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8), scale


def qdq_linear(op: str = "Conv", *, x_scale=0.05, x_zero: int = 128, x_dtype=np.uint8, bias: bool = True,
               act: str | None = None, clip=(0.0, 6.0), out_q=None, trans_b: int = 1, alpha: float = 1.0,
               beta: float = 1.0, bias_first: bool = False, second_reader: bool = False,
               seed: int = 0) -> onnx.ModelProto:
    """A linear op already in QDQ form: ``x → Q(x_scale, x_zero) → DQ`` (per-tensor, or per-axis
    on axis 1 when ``x_scale`` is an array), int8 per-channel weight behind a DQ, float bias.

    ``op``: ``Conv`` (x[1,3,6,6], 8 output channels), ``Gemm`` (x[4,16], 8 outputs; ``trans_b``,
    ``alpha``, ``beta``) or ``MatMul`` (x[4,16] · W[16,8], bias through an ``Add``, its
    constant first when ``bias_first``; ``second_reader`` adds a second reader of the MatMul).
    ``act``: None, ``Relu`` or ``Clip`` (``clip`` bounds). ``out_q=(scale, zero)`` quantizes the
    output to uint8 ``y``; else ``y`` is float."""
    rng = np.random.default_rng(seed)
    xs = np.asarray(x_scale, np.float32)
    x_shape = [1, 3, 6, 6] if op == "Conv" else [4, 16]
    y_shape = [1, 8, 6, 6] if op == "Conv" else [4, 8]
    if op == "Conv":
        w, axis, channels = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), 0, 8
    elif op == "Gemm":
        w = rng.normal(0, 0.3, (8, 16) if trans_b else (16, 8)).astype(np.float32)
        axis, channels = (0 if trans_b else 1), 8
    else:
        w, axis, channels = rng.normal(0, 0.3, (16, 8)).astype(np.float32), 1, 8
    w_q, w_s = symmetric_int8(w, axis)
    inits = {
        "x_s": xs,
        "x_z": np.full(xs.shape, x_zero, x_dtype),
        "w_q": w_q,
        "w_s": w_s,
        "w_z": np.zeros(channels, np.int8),
    }
    q_attrs = {"axis": 1} if xs.size > 1 else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"], name="x_quant", **q_attrs),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], name="x_dequant", **q_attrs),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], name="w_dequant", axis=axis),
    ]
    if bias:
        inits["b"] = rng.normal(0, 0.2, (channels,)).astype(np.float32)
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["x_dq", "w_dq"] + (["b"] if bias else []), ["lin"],
                                      pads=[1, 1, 1, 1], name="conv"))
    elif op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["x_dq", "w_dq"] + (["b"] if bias else []), ["lin"],
                                      transB=trans_b, alpha=alpha, beta=beta, name="gemm"))
    elif bias:
        nodes.append(helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"], name="matmul"))
        nodes.append(helper.make_node("Add", ["b", "mm"] if bias_first else ["mm", "b"], ["lin"], name="bias_add"))
    else:
        nodes.append(helper.make_node("MatMul", ["x_dq", "w_dq"], ["lin"], name="matmul"))
    out = "lin"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["lin"], ["act"], name="relu"))
        out = "act"
    elif act == "Clip":
        inits["lo"], inits["hi"] = np.float32(clip[0]), np.float32(clip[1])
        nodes.append(helper.make_node("Clip", ["lin", "lo", "hi"], ["act"], name="clip"))
        out = "act"
    outputs = []
    if out_q is not None:
        inits["y_s"], inits["y_z"] = np.float32(out_q[0]), np.uint8(out_q[1])
        nodes.append(helper.make_node("QuantizeLinear", [out, "y_s", "y_z"], ["y"], name="y_quant"))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.UINT8, y_shape))
    else:
        for node in nodes:  # the last value is the float graph output "y"
            node.output[:] = ["y" if name == out else name for name in node.output]
            node.input[:] = ["y" if name == out else name for name in node.input]
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape))
    if second_reader:
        nodes.append(helper.make_node("Relu", ["mm"], ["m"], name="second_reader"))
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, y_shape))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs,
                      inits, opset=QDQ_OPSET)
