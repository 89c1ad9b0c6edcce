import numpy as np
import pytest

import models
from qcompiler.grid import GridMatch, detect_grid


def _fp16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _gguf_q4_1(k=256, n=48, g=32, seed=0):
    """GGUF Q4_1 as transformers' loader expands it: fp16 ``d`` and ``m`` per block of ``g`` input
    channels, ``w = float32(d)·q + float32(m)`` in float32, with 0 and 15 in every block."""
    rng = np.random.default_rng(seed)
    d = _fp16(rng.uniform(1e-3, 2e-2, size=(k // g, 1, n)))
    m = _fp16(-rng.uniform(1e-2, 0.2, size=(k // g, 1, n)))
    q = rng.integers(0, 16, size=(k // g, g, n))
    q[:, 0], q[:, -1] = 0, 15
    w = d * q.astype(np.float32) + m
    return w.reshape(k, n), q.reshape(k, n), d[:, 0], m[:, 0]


def _symmetric(k=256, n=48, g=32, bits=4, seed=0):
    """``w = d·j`` with signed ``j`` (GGUF Q4_0: ``j = q − 8``; Q8_0: ``j ∈ [−127, 127]``)."""
    rng = np.random.default_rng(seed)
    half = 1 << (bits - 1)
    d = _fp16(rng.uniform(1e-3, 2e-2, size=(k // g, 1, n)))
    j = rng.integers(-half, half, size=(k // g, g, n))
    j[:, 0], j[:, -1] = -half, half - 1
    return (d * j.astype(np.float32)).reshape(k, n), j.reshape(k, n), d[:, 0]


def test_gguf_q4_1_is_found_exactly():
    w, q, d, m = _gguf_q4_1()
    match = detect_grid(w)
    assert (match.bits, match.group_size, match.block) == (4, 32, (32, 1))
    np.testing.assert_array_equal(match.q, q)
    np.testing.assert_array_equal(match.scale, d)
    np.testing.assert_array_equal(match.offset, m)
    np.testing.assert_array_equal(match.dequantize(), w)
    assert match.max_error == 0.0
    assert match.zero_point is None  # m / d is not an integer


def test_group_32_is_not_reported_as_larger_groups():
    w, *_ = _gguf_q4_1(k=512)
    assert detect_grid(w, block_sizes=(128, 64)) is None
    assert detect_grid(w, block_sizes=(32, 64, 128)).group_size == 32  # order given does not matter


def test_larger_group_wins_when_it_fits():
    w, *_ = _gguf_q4_1(k=256, g=128)
    assert detect_grid(w).group_size == 128
    assert detect_grid(w, block_sizes=(64, 32)).group_size == 64  # a 128 grid is also a 64 grid


def test_symmetric_q4_0_grid_has_zero_point_8():
    w, j, d = _symmetric(bits=4)
    match = detect_grid(w)
    assert (match.bits, match.group_size) == (4, 32)
    np.testing.assert_array_equal(match.zero_point, 8)
    np.testing.assert_array_equal(match.scale, d)
    np.testing.assert_array_equal(match.q.astype(int) - 8, j)
    assert match.max_error == 0.0


def test_q8_0_grid():
    w, j, d = _symmetric(k=128, bits=8)
    j[j == -128] = -127  # Q8_0 uses ±127
    w = (np.repeat(d, 32, axis=0) * j.astype(np.float32)).astype(np.float32)
    match = detect_grid(w)
    assert (match.bits, match.group_size) == (8, 32)
    z = np.repeat(match.zero_point, 32, axis=0)
    np.testing.assert_array_equal(match.q.astype(int) - z, j)
    np.testing.assert_array_equal(match.dequantize(), w)


@pytest.mark.parametrize("levels, bits", [(4, 2), (8, 3), (32, 5), (64, 6), (101, 8), (256, 8)])
def test_smallest_bit_width_that_fits(levels, bits):
    rng = np.random.default_rng(levels)
    g, n = 64, 16
    scale = _fp16(rng.uniform(0.01, 0.1, size=(2, 1, n)))
    q = rng.integers(0, levels, size=(2, g, n))
    q[:, 0], q[:, 1], q[:, 2] = 0, levels - 1, 1  # full range, adjacent levels
    w = (scale * q.astype(np.float32) + np.float32(-0.5)).reshape(2 * g, n)
    match = detect_grid(w, block_sizes=(64,))
    assert match.bits == bits
    assert match.max_error <= 4 * np.spacing(np.float32(np.abs(w).max()))


def test_gaussian_is_rejected():
    w = np.random.default_rng(0).normal(size=(512, 64)).astype(np.float32)
    assert detect_grid(w) is None
    assert detect_grid(w * np.float32(1e-3)) is None


def test_noisy_grid_is_rejected():
    w, *_ = _gguf_q4_1()
    noise = np.random.default_rng(1).normal(scale=1e-2 * 1e-3, size=w.shape).astype(np.float32)
    assert detect_grid(w + noise) is None  # ~1 % of a step off: not a grid to float rounding


def test_constant_blocks():
    w, q, d, m = _gguf_q4_1(k=128, n=4)
    w[:32, 0] = 0.0
    w[32:64, 1] = 0.75
    w[64:96, 2] = -0.25
    match = detect_grid(w)
    assert (match.bits, match.group_size) == (4, 32)
    assert not match.q[:32, 0].any() and not match.q[32:64, 1].any()
    np.testing.assert_array_equal(match.dequantize(), w)
    assert match.scale[0, 0] > 0 and match.scale[1, 1] > 0


def test_all_constant_tensor():
    match = detect_grid(np.full((64, 3), -2.0, np.float32))
    assert match.group_size == 64 and match.bits == 2 and not match.q.any()
    np.testing.assert_array_equal(match.dequantize(), -2.0)
    np.testing.assert_array_equal(match.zero_point, 1)  # -2 = 2 · (0 - 1)


def test_blocks_with_few_levels():
    w, q, d, m = _gguf_q4_1(k=64, n=3)
    # Block (0, 0): only levels {0, 5, 15} -> its coarsest grid has step 5·d.
    q[:32, 0] = np.resize([0, 5, 15], 32)
    # Block (1, 1): levels {0, 2, 5, 15}, no two adjacent (fallback search), steps of d.
    q[32:, 1] = np.resize([0, 2, 5, 15], 32)
    w = (np.repeat(d, 32, axis=0) * q.astype(np.float32) + np.repeat(m, 32, axis=0)).astype(np.float32)
    match = detect_grid(w)
    assert (match.bits, match.group_size) == (4, 32)
    assert match.scale[0, 0] == pytest.approx(5 * d[0, 0], rel=1e-6)
    np.testing.assert_array_equal(match.q[:32, 0], q[:32, 0] // 5)
    assert match.scale[1, 1] == pytest.approx(d[1, 1], rel=1e-6)
    np.testing.assert_array_equal(match.q[32:, 1], q[32:, 1])
    np.testing.assert_array_equal(match.dequantize(), w)


def test_rows_not_divisible_by_the_group():
    w, *_ = _gguf_q4_1(k=80, g=16)
    assert detect_grid(w, block_sizes=(32,)) is None  # 80 % 32 != 0: no such blocks
    assert detect_grid(w, block_sizes=(32, 16)).group_size == 16


def test_chunked_columns_equal_unchunked(monkeypatch):
    from qcompiler import grid

    w, *_ = _gguf_q4_1(k=128, n=40)
    whole = detect_grid(w)
    monkeypatch.setattr(grid, "_CHUNK_ELEMENTS", 128 * 7)
    chunked = detect_grid(w)
    for field in ("q", "scale", "offset"):
        np.testing.assert_array_equal(getattr(whole, field), getattr(chunked, field))


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        detect_grid(np.zeros(32, np.float32))
    with pytest.raises(ValueError):
        detect_grid(np.zeros((32, 2), np.float32), bits=(9,))
    assert detect_grid(np.full((32, 2), np.nan, np.float32)) is None


# --- the reference model (its weights come from a GGUF Q4_1 file) ----------------------------

SMOLLM2 = models.DEFAULT_CACHE / "smollm2" / "model.onnx"
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.is_file(), reason="no cached SmolLM2 export")


@pytest.fixture(scope="module")
def smollm2_weights():
    return _smollm2_weights()


def _smollm2_weights():
    """``{name: W [K, N]}`` of every MatMul weight (an initializer, or one fed through
    ``Transpose(perm=[1, 0])``: the tied lm_head) and ``{name: table [vocab, hidden]}`` of every
    Gather'ed embedding table."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(SMOLLM2)
    inits = {i.name: i for i in model.graph.initializer}
    transposed = {
        node.output[0]: node.input[0]
        for node in model.graph.node
        if node.op_type == "Transpose" and node.input[0] in inits
        and list(onnx.helper.get_attribute_value(node.attribute[0])) == [1, 0]
    }
    matmul, tables = {}, {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            matmul[node.input[1]] = numpy_helper.to_array(inits[node.input[1]])
        elif node.op_type == "MatMul" and node.input[1] in transposed:
            name = transposed[node.input[1]]
            matmul[name + ".T"] = numpy_helper.to_array(inits[name]).T
        elif node.op_type == "Gather" and node.input[0] in inits:
            tables[node.input[0]] = numpy_helper.to_array(inits[node.input[0]])
    return matmul, tables


def _check_q4_1(w: np.ndarray, match: GridMatch) -> None:
    assert (match.bits, match.group_size) == (4, 32)
    assert match.max_error == 0.0  # bit-exact: fp16 d and m, q in [0, 15]
    q = match.q.reshape(-1, 32, w.shape[1])
    assert np.all(q.min(axis=1) == 0) and np.all(q.max(axis=1) == 15)  # d = (max − min) / 15
    np.testing.assert_array_equal(_fp16(match.scale), match.scale)
    np.testing.assert_array_equal(_fp16(match.offset), match.offset)


def _check_q8_0(table: np.ndarray) -> None:
    """Blocks of 32 along the hidden dimension: ``w = d·j``, fp16 ``d``, ``j ∈ [−127, 127]`` with
    ``max |j| = 127`` in every block (GGUF Q8_0)."""
    assert detect_grid(table) is None  # blocks along the vocabulary: no grid
    match = detect_grid(table.T)  # [hidden, vocab]: K = hidden, as lm_head's MatMul sees it
    assert (match.bits, match.group_size) == (8, 32)
    assert match.max_error == 0.0
    j = match.q.astype(np.int32) - np.repeat(match.zero_point, 32, axis=0)
    assert np.all(np.abs(j).reshape(-1, 32, j.shape[1]).max(axis=1) == 127)
    np.testing.assert_array_equal(_fp16(match.scale), match.scale)


@needs_smollm2
def test_smollm2_first_layer_is_q4_1_and_embedding_q8_0(smollm2_weights):
    matmul, tables = smollm2_weights
    first_layer = [name for name in matmul if not name.endswith(".T")][:7]  # q, k, v, o, gate, up, down
    assert sorted(matmul[name].shape for name in first_layer) == sorted(
        [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)])
    for name in first_layer:
        _check_q4_1(matmul[name], detect_grid(matmul[name]))
    (table,) = tables.values()
    assert table.shape == (49152, 576)
    _check_q8_0(table)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_every_matmul_weight_is_q4_1(smollm2_weights):
    matmul, _ = smollm2_weights
    assert len(matmul) == 211  # 30 layers × 7 and the tied lm_head
    for name, w in matmul.items():
        if name.endswith(".T"):
            continue  # the embedding table (Q8_0), checked above
        _check_q4_1(w, detect_grid(w))
