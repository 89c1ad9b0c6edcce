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


# --- builders for SmoothQuant tests (opset 18): activations with outlier channels -------------


def _outlier_columns(w: np.ndarray, channels, factor: float) -> np.ndarray:
    """``w`` with the given output columns multiplied by ``factor`` (outlier channels)."""
    w = w.copy()
    w[:, list(channels)] *= factor
    return w


def layernorm_qkv(d: int = 16, n: int = 8, outliers=(3, 11), factor: float = 50.0,
                  shared_gamma: bool = False, residual: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[B,S,d] → LayerNormalization(γ, β) → three MatMuls (q, k, v) → graph outputs.

    γ is ``factor`` times larger on the ``outliers`` channels (so the normalized activation
    has outlier channels). ``shared_gamma``: γ is also read by an Add (→ output ``g``);
    ``residual``: the LayerNorm output is also read by a residual Add (→ output ``r``)."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, d).astype(np.float32)
    gamma[list(outliers)] *= factor
    inits = {
        "gamma": gamma,
        "beta": rng.normal(0, 0.1, d).astype(np.float32),
        "wq": rng.normal(0, 0.3, (d, n)).astype(np.float32),
        "wk": rng.normal(0, 0.3, (d, n)).astype(np.float32),
        "wv": rng.normal(0, 0.3, (d, n)).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-5, name="ln"),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["h", "wv"], ["v"], name="v_proj"),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "S", n]) for name in "qkv"]
    if shared_gamma:
        nodes.append(helper.make_node("Add", ["x", "gamma"], ["g"], name="gamma_reader"))
        outputs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, ["B", "S", d]))
    if residual:
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"], name="residual"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["B", "S", d]))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])],
                      outputs, inits)


def rms_norm_nodes() -> list:
    """SmolLM2's exported RMSNorm, ``h = γ · x / sqrt(mean(x²) + ε)``: reads ``x``, ``two``,
    ``axes``, ``eps``, ``gamma``; writes ``h``."""
    return [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, name="mean"),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
        helper.make_node("Reciprocal", ["rms"], ["inv"], name="reciprocal"),
        helper.make_node("Mul", ["x", "inv"], ["normed"], name="normalize"),
        helper.make_node("Mul", ["gamma", "normed"], ["h"], name="rms_scale"),
    ]


def rmsnorm_swiglu(d: int = 16, f: int = 32, outliers=(2, 9), up_outliers=(5, 20), factor: float = 50.0,
                   seed: int = 0) -> onnx.ModelProto:
    """A Llama MLP block: RMSNorm written out (Pow → ReduceMean → Add ε → Sqrt → Reciprocal →
    Mul x, then Mul(γ, ·)) → gate and up MatMuls → silu(gate)·up (Sigmoid, Mul, Mul) → down.

    γ is ``factor`` times larger on ``outliers``; up's columns ``up_outliers`` are ``factor``
    times larger (down's input has outlier channels)."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, d).astype(np.float32)
    gamma[list(outliers)] *= factor
    inits = {
        "two": np.array(2.0, np.float32),
        "axes": np.array([-1], np.int64),
        "eps": np.array(1e-6, np.float32),
        "gamma": gamma,
        "w_gate": rng.normal(0, 0.3, (d, f)).astype(np.float32),
        "w_up": _outlier_columns(rng.normal(0, 0.3, (d, f)).astype(np.float32), up_outliers, factor),
        "w_down": rng.normal(0, 0.3, (f, d)).astype(np.float32),
    }
    nodes = [
        *rms_norm_nodes(),
        helper.make_node("MatMul", ["h", "w_gate"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["h", "w_up"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["act"], name="glu"),
        helper.make_node("MatMul", ["act", "w_down"], ["y"], name="down_proj"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])], inits)


def attention_v_o(d: int = 16, heads: int = 2, kv_heads: int = 2, head_dim: int = 4, n: int = 8,
                  outliers=(1, 6), factor: float = 50.0, seed: int = 0) -> onnx.ModelProto:
    """The value path of attention: v = x·Wv + bv → Reshape [B,S,Hkv,Dh] → (grouped-query:
    Reshape [B,S,Hkv,1,Dh] → Expand ×heads/kv_heads → Reshape [B,S,H,Dh]) → Transpose →
    MatMul(Softmax(scores), ·) → Transpose → Reshape [B,S,H·Dh] → o_proj.

    ``scores`` [B,H,S,S] is a second input. Wv's columns and bv's entries ``outliers`` are
    ``factor`` times larger (o_proj's input has outlier channels)."""
    rng = np.random.default_rng(seed)
    kv = kv_heads * head_dim
    bv = rng.normal(0, 0.1, kv).astype(np.float32)
    bv[list(outliers)] *= factor
    inits = {
        "wv": _outlier_columns(rng.normal(0, 0.3, (d, kv)).astype(np.float32), outliers, factor),
        "bv": bv,
        "wo": rng.normal(0, 0.3, (heads * head_dim, n)).astype(np.float32),
        "merged_shape": np.array([0, 0, heads * head_dim], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "wv"], ["v_mm"], name="v_proj"),
        helper.make_node("Add", ["v_mm", "bv"], ["v"], name="v_bias"),
    ]
    if kv_heads == heads:
        inits["split_shape"] = np.array([0, 0, heads, head_dim], np.int64)
        nodes.append(helper.make_node("Reshape", ["v", "split_shape"], ["v_heads"], name="v_split"))
    else:
        repeat = heads // kv_heads
        inits["kv_shape"] = np.array([0, 0, kv_heads, 1, head_dim], np.int64)
        inits["expand_shape"] = np.array([1, 1, kv_heads, repeat, head_dim], np.int64)
        inits["split_shape"] = np.array([0, 0, heads, head_dim], np.int64)
        nodes += [
            helper.make_node("Reshape", ["v", "kv_shape"], ["v_kv"], name="v_split"),
            helper.make_node("Expand", ["v_kv", "expand_shape"], ["v_rep"], name="v_repeat"),
            helper.make_node("Reshape", ["v_rep", "split_shape"], ["v_heads"], name="v_merge_repeat"),
        ]
    nodes += [
        helper.make_node("Transpose", ["v_heads"], ["v_t"], perm=[0, 2, 1, 3], name="v_transpose"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "v_t"], ["ctx"], name="attend"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_transpose"),
        helper.make_node("Reshape", ["ctx_t", "merged_shape"], ["ctx_m"], name="ctx_merge"),
        helper.make_node("MatMul", ["ctx_m", "wo"], ["y"], name="o_proj"),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", heads, "S", "S"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
        inits,
    )


def relu_outliers(d: int = 16, f: int = 32, outliers=(4, 17), factor: float = 100.0, sign_weights: bool = False,
                  scale_constant: float | None = None, seed: int = 0) -> onnx.ModelProto:
    """x → fc1 → Relu → fc2: fc2's input comes from a Relu (no absorber) and fc1's columns
    ``outliers`` are ``factor`` times larger (strong outlier channels).

    ``sign_weights``: fc1's weight is ±127 (times ``factor`` on ``outliers``): int8 per-channel
    quantization represents it exactly. ``scale_constant``: ``Mul(Relu(·), c)`` by a scalar Constant node
    (not an initializer) before fc2."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (d, f)).astype(np.float32)
    if sign_weights:
        w1 = (127.0 * np.sign(w1)).astype(np.float32)
    inits = {
        "w1": _outlier_columns(w1, outliers, factor),
        "w2": rng.normal(0, 0.3, (f, d)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
    ]
    if scale_constant is not None:
        nodes += [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(scale_constant, np.float32)),
                             name="c_const"),
            helper.make_node("Mul", ["a", "c"], ["a_scaled"], name="scale"),
            helper.make_node("MatMul", ["a_scaled", "w2"], ["y"], name="fc2"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])], inits)
