"""KeepGridPass: a MatMul weight already on a low-bit grid (GGUF Q4_1 / Q8_0, built here by hand)
is kept exactly on it, a Gaussian weight is not; through the whole weight-only pipeline the kept
grid reproduces the float model's output to float rounding (ONNX Runtime, both targets)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from passes.canonicalize import CanonicalizePass
from passes.keep_grid import KeepGridPass
from passes.select_targets import SelectTargetsPass
from qcompiler.config import WeightOnlyConfig
from qcompiler.packed_weight import WEIGHT_KEY, PackedWeight
from qcompiler.pipeline import compile_model
from tests import graphs
from tests.passes.helpers import to_ir

G = 32  # GGUF block: 32 consecutive input channels


def _fp16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def q4_1(k: int, n: int, seed: int = 0):
    """GGUF Q4_1 as a loader expands it: fp16 ``d``, ``m`` per block of 32 rows, ``w = d·q + m``
    in float32, ``q`` in 0..15 with 0 and 15 in every block. Returns ``(w, q, d, m)``."""
    rng = np.random.default_rng(seed)
    d = _fp16(rng.uniform(1e-3, 2e-2, (k // G, n)))
    m = _fp16(-rng.uniform(1e-2, 0.2, (k // G, n)))
    q = rng.integers(0, 16, (k, n))
    q[::G], q[G - 1 :: G] = 0, 15
    w = np.repeat(d, G, axis=0) * q.astype(np.float32) + np.repeat(m, G, axis=0)
    return w.astype(np.float32), q, d, m


def q8_0(k: int, n: int, seed: int = 1):
    """GGUF Q8_0: ``w = d·j``, fp16 ``d`` per block of 32 rows, ``j`` in −127..127 with both ends
    in every block. Returns ``(w, j, d)``."""
    rng = np.random.default_rng(seed)
    d = _fp16(rng.uniform(1e-3, 2e-2, (k // G, n)))
    j = rng.integers(-127, 128, (k, n))
    j[::G], j[G - 1 :: G] = -127, 127
    return (np.repeat(d, G, axis=0) * j.astype(np.float32)).astype(np.float32), j, d


def two_layers(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x[B, S, K] → fc1(w1) → Relu → fc2(w2) → y."""
    k, f = w1.shape
    n = w2.shape[1]
    return graphs.make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["a"], name="relu"),
         helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
        {"w1": w1, "w2": w2},
    )


def gaussian(k: int, n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, (k, n)).astype(np.float32)


def annotate(proto: onnx.ModelProto):
    model = to_ir(proto)
    CanonicalizePass()(model)
    SelectTargetsPass(("MatMul",))(model)
    return model


def test_q4_1_weight_is_kept_exactly_and_a_gaussian_one_is_not():
    w1, q, d, m = q4_1(64, 32)
    model = annotate(two_layers(w1, gaussian(32, 16)))
    keep = KeepGridPass(bits=4)
    result = keep(model)
    assert not result.modified  # annotations only: the emitters rewrite the graph
    packed = model.graph.node("fc1").meta[WEIGHT_KEY]
    assert isinstance(packed, PackedWeight)
    assert (packed.method, packed.bits, packed.group_size, packed.form) == ("grid", 4, 32, "offset")
    np.testing.assert_array_equal(packed.q, q)
    np.testing.assert_array_equal(packed.scale, d)
    np.testing.assert_array_equal(packed.offset, m)
    np.testing.assert_array_equal(packed.dequantize(), w1)  # bit-exact, not approximately
    assert WEIGHT_KEY not in model.graph.node("fc2").meta
    assert keep.kept == {"fc1": "4-bit, blocks of 32"}
    assert keep.summary == "1 weights kept on their grid (1× 4-bit, blocks of 32)"


def test_8_bit_grid_is_kept_even_when_the_recipe_asks_for_4_bits():
    """Documented policy: the source chose the wider grid for a sensitive tensor; re-rounding it
    to 4 bits would add error (llama.cpp's Q8_0 LM head)."""
    w1, _, _, _ = q4_1(64, 32)
    w2, j, d = q8_0(32, 16)
    model = annotate(two_layers(w1, w2))
    keep = KeepGridPass(bits=4)
    keep(model)
    packed = model.graph.node("fc2").meta[WEIGHT_KEY]
    # w = d·j = d·(q − 127) with q = j + 127 in 0..254: an integer zero point, affine form.
    assert (packed.bits, packed.group_size, packed.form) == (8, 32, "affine")
    assert np.all(packed.zero_point == 127)
    np.testing.assert_array_equal(packed.q.astype(np.int64) - np.repeat(packed.zero_point, G, axis=0), j)
    np.testing.assert_array_equal(packed.scale, d)
    np.testing.assert_array_equal(packed.dequantize(), w2)
    assert keep.kept == {"fc1": "4-bit, blocks of 32", "fc2": "8-bit, blocks of 32"}
    assert "2 weights kept" in keep.summary and "1× 8-bit, blocks of 32" in keep.summary


def test_gaussian_weights_leave_nothing_kept():
    model = annotate(two_layers(gaussian(64, 32), gaussian(32, 16, seed=3)))
    keep = KeepGridPass(bits=4)
    assert not keep(model).modified
    assert not any(WEIGHT_KEY in n.meta for n in model.graph)
    assert keep.kept == {} and keep.summary == "no weight on a grid"


def test_decided_weight_is_left_alone_and_a_second_run_changes_nothing():
    w1, *_ = q4_1(64, 32)
    w2, *_ = q8_0(32, 16)
    model = annotate(two_layers(w1, w2))
    decided = PackedWeight(4, 64, np.zeros((64, 32), np.uint8), "rtn", scale=np.ones((1, 32), np.float32),
                           zero_point=np.zeros((1, 32), np.uint8))
    model.graph.node("fc1").meta[WEIGHT_KEY] = decided
    keep = KeepGridPass(bits=4)
    keep(model)
    assert model.graph.node("fc1").meta[WEIGHT_KEY] is decided
    assert list(keep.kept) == ["fc2"]
    kept = model.graph.node("fc2").meta[WEIGHT_KEY]
    assert not keep(model).modified
    assert model.graph.node("fc2").meta[WEIGHT_KEY] is kept


def test_untargeted_matmul_is_not_kept():
    """Excluded nodes are not targets: their weight stays float whatever its grid."""
    w1, *_ = q4_1(64, 32)
    model = to_ir(two_layers(w1, q8_0(32, 16)[0]))
    SelectTargetsPass(("MatMul",), exclude=("fc1",))(model)
    keep = KeepGridPass(bits=4)
    keep(model)
    assert list(keep.kept) == ["fc2"] and WEIGHT_KEY not in model.graph.node("fc1").meta


# --- through the pipeline: exact grids give the float model's output ---------------------------


@pytest.fixture
def grid_model(tmp_path):
    w1, *_ = q4_1(64, 32)
    w2, *_ = q8_0(32, 16)
    path = tmp_path / "grid.onnx"
    onnx.save(two_layers(w1, w2), path)
    return path


def _outputs(path, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("target, weight_op, domains", [
    ("ort-cpu", "MatMulNBits", {"", "com.microsoft"}),
    ("qdq", "DequantizeLinear", {""}),
])
def test_kept_grids_reproduce_the_float_model(grid_model, tmp_path, target, weight_op, domains):
    out = tmp_path / f"grid.{target}.onnx"
    compile_model(grid_model, out, WeightOnlyConfig(bits=4, group_size=128, target=target), progress=False)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert weight_op in ops and {n.domain for n in proto.graph.node} == domains
    assert not [i.name for i in proto.graph.initializer if i.name in ("w1", "w2")]  # float weights gone
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["qcompile.kept_grid"]) == {"fc1": "4-bit, blocks of 32", "fc2": "8-bit, blocks of 32"}
    x = np.random.default_rng(5).normal(size=(2, 7, 64)).astype(np.float32)
    want, got = _outputs(grid_model, x), _outputs(out, x)
    # The grids are exact: only the float summation order differs (no quantization error, which
    # at 4 bits in groups of 128 would be ~1e-1 relative).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_no_keep_grid_re_rounds_to_the_requested_bits(grid_model, tmp_path):
    out = tmp_path / "grid.regrid.onnx"
    config = WeightOnlyConfig(bits=4, group_size=32, keep_grid=False, lm_head_bits=None)
    compile_model(grid_model, out, config, progress=False)
    proto = onnx.load(out)
    assert "qcompile.kept_grid" not in {p.key for p in proto.metadata_props}
    bits = [a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    assert bits == [4, 4]  # the Q8_0 weight too (lm_head_bits=None: fc2 is not held at 8 bits)
    x = np.random.default_rng(5).normal(size=(2, 7, 64)).astype(np.float32)
    want, got = _outputs(grid_model, x), _outputs(out, x)
    assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()  # re-rounding costs accuracy


# --- the reference model: SmolLM2 comes from GGUF Q4_1 with a Q8_0 tied embedding ------------

try:
    import models

    SMOLLM2 = models.DEFAULT_CACHE / "smollm2" / "model.onnx"
except ImportError:  # the models extra is not installed
    SMOLLM2 = None


@pytest.mark.skipif(SMOLLM2 is None or not SMOLLM2.is_file(), reason="no cached SmolLM2 export")
def test_smollm2_grids_are_all_found():
    from qcompiler import ir_utils

    model = ir_utils.load_model(SMOLLM2)
    CanonicalizePass()(model)
    SelectTargetsPass(("MatMul",))(model)
    keep = KeepGridPass(bits=4)
    keep(model)
    assert keep.summary == "211 weights kept on their grid (210× 4-bit, blocks of 32, 1× 8-bit, blocks of 32)"
    head = [name for name, kind in keep.kept.items() if kind.startswith("8-bit")]
    assert len(head) == 1 and model.graph.node(head[0]).meta[WEIGHT_KEY].form == "affine"
