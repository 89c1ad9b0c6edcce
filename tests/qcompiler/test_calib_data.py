import numpy as np
import onnx
import pytest

from qcompiler import calib_data
from qcompiler.errors import QCompileError
from qcompiler.ir_utils import load_model
from tests import graphs


@pytest.fixture
def specs(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(), path)
    return calib_data.input_specs(load_model(path))


def test_stacked_npz_gives_one_feed_per_sample(tmp_path, specs):
    x = np.random.default_rng(0).normal(size=(5, 1, 3, 32)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    feeds = list(calib_data.npz_source(tmp_path / "c.npz", specs)())
    assert len(feeds) == 5
    np.testing.assert_array_equal(feeds[3]["x"], x[3])


def test_folder_allows_varying_lengths(tmp_path, specs):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, seq in enumerate((3, 7)):
        np.savez(folder / f"{i}.npz", x=np.ones((1, seq, 32), np.float32))
    shapes = [f["x"].shape for f in calib_data.npz_source(folder, specs)()]
    assert shapes == [(1, 3, 32), (1, 7, 32)]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.ones((2, 1, 3, 32), np.float32)}, "missing"),
        ({"x": np.ones((2, 3, 32), np.float32)}, "rank"),
        ({"x": np.full((2, 1, 3, 32), np.nan, np.float32)}, "NaN"),
        ({"x": np.array([[[["a"] * 32] * 3]] * 2)}, "expects float32"),
    ],
)
def test_bad_data_fails_with_a_clear_message(tmp_path, specs, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(QCompileError, match=message):
        list(calib_data.npz_source(tmp_path / "bad.npz", specs)())


def test_unreadable_or_missing_files(tmp_path, specs):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(QCompileError, match="cannot read"):
        calib_data.npz_source(tmp_path / "junk.npz", specs)
    with pytest.raises(QCompileError, match="not found"):
        calib_data.npz_source(tmp_path / "missing.npz", specs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QCompileError, match="no .npz"):
        calib_data.npz_source(empty, specs)
