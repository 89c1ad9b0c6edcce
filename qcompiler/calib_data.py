"""Calibration feeds from the command line, checked against the model's inputs.

* ``--calib-data FILE.npz``: arrays named after the model inputs, samples stacked on a new
  leading axis (``input_ids: [N, 1, 512]`` gives N feeds of ``[1, 512]``);
* ``--calib-data FOLDER``: one ``.npz`` per feed (sequence lengths may differ), sorted by name;
* ``--calib-text FILE --tokenizer DIR``: raw text, tokenized for the model — a language model
  (single ``input_ids`` input) gets consecutive windows of ``seq_len`` tokens, an encoder
  (``input_ids`` + ``attention_mask``…) one feed per non-empty line.

Every feed is checked (names, dtypes, ranks, finite values) so that a wrong file fails with one
line before ONNX Runtime sees it. ``FeedSource`` callables return a fresh iterator each call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from qcompiler.calibration import Feed, FeedSource
from qcompiler.errors import QCompileError, first_line

_NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: type | None
    rank: int | None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Name, numpy dtype and rank of each graph input that is not an initializer."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = _NUMPY_DTYPES.get(value.dtype) if value.dtype is not None else None
        rank = len(value.shape) if value.shape is not None else None
        specs.append(InputSpec(value.name, dtype, rank))
    return specs


def check_feed(feed: Feed, specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    """The feed with dtypes matching the model, or a QCompileError naming the problem."""
    names = {s.name for s in specs}
    missing = sorted(names - set(feed))
    extra = sorted(set(feed) - names)
    if missing or extra:
        raise QCompileError(
            f"{where}: inputs do not match the model (missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}; the model takes {sorted(names)})"
        )
    checked = {}
    for spec in specs:
        array = np.asarray(feed[spec.name])
        if array.size == 0:
            raise QCompileError(f"{where}: input {spec.name!r} is empty")
        if spec.rank is not None and array.ndim != spec.rank:
            raise QCompileError(
                f"{where}: input {spec.name!r} has rank {array.ndim}, the model expects {spec.rank}"
            )
        if spec.dtype is not None and array.dtype != spec.dtype:
            if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise QCompileError(
                    f"{where}: input {spec.name!r} is {array.dtype}, the model expects "
                    f"{np.dtype(spec.dtype).name}"
                )
            array = array.astype(spec.dtype)
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise QCompileError(f"{where}: input {spec.name!r} holds NaN or Inf values")
        checked[spec.name] = array
    return checked


def npz_source(path: str | Path, specs: list[InputSpec]) -> FeedSource:
    """Feeds from an .npz of stacked samples or a folder of one-feed .npz files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise QCompileError(f"no .npz files in the calibration folder {path}")

        def from_folder() -> Iterator[Feed]:
            for file in files:
                yield check_feed(_read_npz(file), specs, file.name)

        return from_folder
    stacked = _read_npz(path)
    counts = {name: len(a) if np.asarray(a).ndim else 0 for name, a in stacked.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise QCompileError(
            f"{path}: arrays must share one leading sample axis, got sample counts {counts}"
        )

    def from_file() -> Iterator[Feed]:
        for i in range(next(iter(counts.values()))):
            yield check_feed({k: a[i] for k, a in stacked.items()}, specs, f"{path.name}[{i}]")

    return from_file


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise QCompileError(f"calibration data not found: {path}")
    if path.is_dir():
        raise QCompileError(f"expected an .npz file, got a folder: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise QCompileError(f"cannot read {path} as an .npz file ({first_line(exc)})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise QCompileError(f"{path} is a single .npy array; save the feeds with np.savez(path, "
                            "NAME=array, ...), one array per model input")
    try:
        with data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise QCompileError(f"cannot read {path} as an .npz file ({first_line(exc)})") from exc


def text_source(
    text_path: str | Path, tokenizer_dir: str | Path, specs: list[InputSpec], seq_len: int = 512
) -> FeedSource:
    """Feeds tokenized from a text file (see the module docstring)."""
    text_path = Path(text_path)
    if not text_path.is_file():
        raise QCompileError(f"calibration text not found: {text_path}")
    text = text_path.read_text(encoding="utf-8", errors="replace")
    tokenizer = load_tokenizer(tokenizer_dir)
    names = {s.name for s in specs}
    if names == {"input_ids"}:
        ids = np.asarray(tokenizer(text)["input_ids"], np.int64)
        windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if not windows:
            raise QCompileError(
                f"{text_path} holds {len(ids)} tokens, fewer than one window of {seq_len}"
            )
        return lambda: (check_feed({"input_ids": w[None]}, specs, "text window") for w in windows)
    if "input_ids" in names and names <= {"input_ids", "attention_mask", "token_type_ids"}:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise QCompileError(f"{text_path} has no non-empty lines")

        def sentences() -> Iterator[Feed]:
            for line in lines:
                encoded = tokenizer(line, truncation=True, max_length=seq_len, return_tensors="np")
                feed = {k: np.asarray(v, np.int64) for k, v in encoded.items() if k in names}
                yield check_feed(feed, specs, "text line")

        return sentences
    raise QCompileError(
        f"--calib-text works for models taking input_ids (language models, encoders); "
        f"this model takes {sorted(names)}: use --calib-data"
    )


def load_tokenizer(tokenizer_dir: str | Path):
    """A Hugging Face tokenizer from a local folder (never the network)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise QCompileError(f"tokenizer folder not found: {tokenizer_dir}")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise QCompileError(
            "--calib-text needs transformers: pip install 'qcompile[models]'"
        ) from exc
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:
        raise QCompileError(f"{tokenizer_dir} is not a tokenizer folder ({first_line(exc)})") from exc


def file_digest(*paths: str | Path) -> str:
    """SHA-256 over the calibration files' bytes (a folder: its .npz files in order), stamped
    into the output model's metadata."""
    h = hashlib.sha256()
    for path in map(Path, paths):
        for file in sorted(path.glob("*.npz")) if path.is_dir() else [path]:
            h.update(file.name.encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class CalibrationInput:
    """Calibration files named on the command line; resolved against the model once it is
    loaded (its input names, dtypes and ranks), so the model is read only once."""

    data: Path | None = None
    text: Path | None = None
    tokenizer: Path | None = None
    seq_len: int = 512

    def __post_init__(self) -> None:
        if self.data is not None and self.text is not None:
            raise QCompileError("give either --calib-data or --calib-text, not both")
        if self.data is None and self.text is None:
            raise QCompileError("no calibration data given: pass --calib-data or --calib-text")
        if self.text is not None and self.tokenizer is None:
            raise QCompileError("--calib-text needs --tokenizer DIR")

    def source(self, model: ir.Model) -> FeedSource:
        """The feeds, with the first one already checked (fail before any compile work)."""
        specs = input_specs(model)
        if self.data is not None:
            feeds = npz_source(self.data, specs)
        else:
            feeds = text_source(self.text, self.tokenizer, specs, self.seq_len)
        next(iter(feeds()), None)
        return feeds

    def digest(self) -> str:
        return file_digest(self.data if self.data is not None else self.text)

