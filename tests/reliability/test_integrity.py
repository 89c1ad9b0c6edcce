"""Nothing is lost, large models, bounded memory, determinism:

* the input model and its external data files are never modified (sha256 before/after);
* outputs (external data included) are staged in a temporary folder and renamed; an output
  never points at the input's data file, nor replaces it;
* "large" models (``ir_utils.EXTERNAL_DATA_THRESHOLD``, monkeypatched small here) are
  calibrated and written through external data files, never a serialized protobuf;
* calibration memory does not grow with the number of samples;
* the same model, data and flags give byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qcompiler import calibration, ir_utils, sequential
from qcompiler.cli import main
from runtime.session import create_session
from tests import graphs

RECIPES = {
    "dynamic": ["--w8a8"],
    "static": ["--w8a8", "--calib-data", "{calib}"],
    "qdq": ["--w8a8", "--calib-data", "{calib}", "--target", "qdq"],
    "rtn": ["--w4a16", "--method", "rtn", "--no-keep-grid"],
    "gptq": ["--w4a16", "--calib-data", "{calib}", "--no-keep-grid"],
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def external_mlp(tmp_path):
    """The mlp with every weight in ``weights.bin`` beside it, and calibration data."""
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save_model(graphs.mlp(), folder / "mlp.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(6, 1, 4, 32)).astype(np.float32))
    return folder / "mlp.onnx", tmp_path / "calib.npz"


def _compile(model: Path, recipe: str, out: Path, calib: Path, *extra: str) -> int:
    args = [a.format(calib=calib) for a in RECIPES[recipe]]
    return main([str(model), *args, "-o", str(out), "--quiet", *extra])


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return create_session(path).run(None, {"x": x})[0]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_input_and_its_external_data_are_never_modified(external_mlp, tmp_path, recipe):
    model, calib = external_mlp
    before = _files(model.parent)
    assert set(before) == {"mlp.onnx", "weights.bin"}
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    assert _compile(model, recipe, out, calib) == 0
    assert main(["plan", str(model), *RECIPES[recipe][:1]]) == 0
    assert _files(model.parent) == before
    # Nothing but the output (and its own data file, if any) was left in the output folder.
    assert {p.name for p in out.parent.iterdir()} <= {"m.onnx", "m.onnx.data"}


def test_output_never_points_at_the_input_data_file(external_mlp, tmp_path):
    """A float weight left as it was (``--exclude``) is still read lazily from the input's
    file: the output copies it into its own data file, so it survives the input's removal."""
    model, calib = external_mlp
    out = tmp_path / "o.onnx"
    assert _compile(model, "dynamic", out, calib, "--exclude", "fc2") == 0
    assert (tmp_path / "o.onnx.data").is_file()
    locations = {e.value for t in onnx.load(out, load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"o.onnx.data"}
    x = np.random.default_rng(1).normal(size=(1, 3, 32)).astype(np.float32)
    expected = _run(out, x)
    (model.parent / "weights.bin").unlink()
    np.testing.assert_array_equal(_run(out, x), expected)


def test_output_that_would_replace_the_input_data_is_refused(tmp_path, capsys):
    onnx.save_model(graphs.mlp(), tmp_path / "a.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="b.onnx.data", size_threshold=0)
    before = _files(tmp_path)
    assert main([str(tmp_path / "a.onnx"), "--w8a8", "--exclude", "fc2", "-o", str(tmp_path / "b.onnx")]) == 2
    assert "would replace the input's external data file" in capsys.readouterr().err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("recipe", ["static", "gptq", "rtn"])
def test_large_models_go_through_external_data(external_mlp, tmp_path, monkeypatch, recipe):
    """With the "large" threshold at 1 kB: calibration and GPTQ's segments holding weights load
    ONNX Runtime from files with external data (never from serialized bytes over the
    threshold), the output has its data file, and it computes exactly what the in-memory path
    computes. (An input with external data also gives an output with external data.)"""
    model, calib = external_mlp
    inline = tmp_path / "inline.onnx"
    onnx.save(graphs.mlp(), inline)
    small_out = tmp_path / "small" / "m.onnx"
    small_out.parent.mkdir()
    assert _compile(inline, recipe, small_out, calib) == 0
    assert not (small_out.parent / "m.onnx.data").exists()  # small, and the input was inline

    sources = []

    def spy(source, *args, **kwargs):
        sources.append(source)
        return create_session(source, *args, **kwargs)

    monkeypatch.setattr(ir_utils, "EXTERNAL_DATA_THRESHOLD", 1000)
    monkeypatch.setattr(calibration, "create_session", spy)
    monkeypatch.setattr(sequential, "create_session", spy)
    large_out = tmp_path / "large" / "m.onnx"
    large_out.parent.mkdir()
    assert _compile(model, recipe, large_out, calib) == 0
    assert (large_out.parent / "m.onnx.data").stat().st_size > 1000
    assert onnx.load(large_out, load_external_data=False).ByteSize() < 20_000
    if recipe != "rtn":  # bytes only for GPTQ's segments whose own weights are small
        assert sources and all(isinstance(s, (str, os.PathLike)) or len(s) < 1000 for s in sources)
    if recipe == "static":
        assert any(isinstance(s, (str, os.PathLike)) for s in sources)
    x = np.random.default_rng(2).normal(size=(2, 5, 32)).astype(np.float32)
    np.testing.assert_array_equal(_run(large_out, x), _run(small_out, x))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_same_inputs_give_byte_identical_outputs(external_mlp, tmp_path, recipe):
    model, calib = external_mlp
    digests = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        assert _compile(model, recipe, folder / "m.onnx", calib) == 0
        digests.append(_files(folder))
    assert digests[0] == digests[1] and "m.onnx" in digests[0]


def test_byte_identical_with_external_output(external_mlp, tmp_path, monkeypatch):
    model, calib = external_mlp
    monkeypatch.setattr(ir_utils, "EXTERNAL_DATA_THRESHOLD", 1000)
    digests = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        assert _compile(model, "static", tmp_path / run / "m.onnx", calib) == 0
        digests.append(_files(tmp_path / run))
    assert digests[0] == digests[1] and set(digests[0]) == {"m.onnx", "m.onnx.data"}


def _calibration_peak(samples: int) -> int:
    """Peak bytes allocated (tracemalloc sees numpy's buffers) while streaming ``samples``
    feeds of [1, 512, 32] through ``collect_stats`` (a generator: one feed alive at a time)."""
    model = ir.serde.deserialize_model(graphs.mlp(k=32, n=48))
    values = [v for n in model.graph for v in n.outputs]
    rng = np.random.default_rng(0)
    feeds = ({"x": rng.normal(size=(1, 512, 32)).astype(np.float32)} for _ in range(samples))
    tracemalloc.start()
    try:
        calibration.collect_stats(model, values, feeds, progress=False, keep_rows=256)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_calibration_memory_does_not_grow_with_samples():
    _calibration_peak(2)  # first-call allocations (imports, caches) out of the way
    few, many = _calibration_peak(8), _calibration_peak(256)
    # 248 more feeds of 64 kB (plus their activations) would add > 16 MB if any were kept.
    assert many < 1.10 * few, (few, many)


def _rss_file_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) // 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_mapped_weight_pages_are_released_and_stay_valid(tmp_path):
    """A 64 MB external weight read once is resident; after ``release_array_pages`` (through a
    transposed view) it is not, and reads back the same values."""
    w = np.random.default_rng(0).normal(size=(2048, 8192)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 2048])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 8192])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin")
    expected = float(w.astype(np.float64).sum())
    del w, model, graph
    loaded = ir_utils.load_model(tmp_path / "m.onnx")
    array = loaded.graph.initializers["w"].const_value.numpy()
    base = _rss_file_mb()
    assert float(array.astype(np.float64).sum()) == expected
    assert _rss_file_mb() - base > 50
    ir_utils.release_array_pages(array.T)
    assert _rss_file_mb() - base < 10
    assert float(array.astype(np.float64).sum()) == expected
    ir_utils.release_mapped_pages(loaded)
    assert _rss_file_mb() - base < 10
    ir_utils.release_array_pages(np.ones(1000, np.float32))  # not a map: nothing happens
