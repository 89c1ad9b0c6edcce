"""End to end on the real reference models: compile through the CLI, evaluate with the harness
on held-apart data, check the issue's accuracy bars and the output's validity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

models = pytest.importorskip("models")
import models.data  # noqa: E402

from qcompiler.cli import main  # noqa: E402

EVAL_SENTENCES = 120


def _compile(args) -> None:
    assert main([*map(str, args), "--quiet"]) == 0


def _check_output(float_path, quant_path):
    quant = onnx.load(quant_path)
    onnx.checker.check_model(quant, full_check=True)
    ref = onnx.load(float_path, load_external_data=False)
    assert [i.name for i in quant.graph.input] == [i.name for i in ref.graph.input]
    assert [o.name for o in quant.graph.output] == [o.name for o in ref.graph.output]


def _eval(float_path, quant_path, task, tmp_path, *extra):
    out = tmp_path / f"{quant_path.stem}.eval.json"
    assert main(["eval", str(float_path), str(quant_path), "--task", task, "--runs", "3", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def minilm():
    return models.export("minilm").onnx_path


@pytest.fixture(scope="module")
def minilm_calib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib") / "minilm"
    models.data.save_feeds_npz(models.data.model_feeds("minilm", "calib"), folder)
    return folder


@pytest.mark.parametrize("scheme, min_mean_cosine", [("static", 0.99), ("per-token", 0.995)])
def test_minilm_w8a8(minilm, minilm_calib, tmp_path, scheme, min_mean_cosine):
    out = tmp_path / f"minilm.{scheme}.onnx"
    calib = ["--calib-data", minilm_calib] if scheme == "static" else []
    _compile([minilm, "--w8a8", "--activations", scheme, *calib, "-o", out])
    _check_output(minilm, out)
    result = _eval(minilm, out, "embedding", tmp_path, "--limit", str(EVAL_SENTENCES))
    m = result["metrics"]
    assert m["sentences"] == EVAL_SENTENCES
    assert m["mean cosine (unpadded)"] >= min_mean_cosine
    assert m["mean cosine (padded batch)"] >= min_mean_cosine
    assert result["quant_bytes"] < 0.3 * result["float_bytes"]  # int8 weights and word embeddings


def test_minilm_calibration_ignores_padding(minilm, tmp_path):
    """Padded calibration batches give the same ranges as unpadded sentences: masked positions
    (and the -3.4e38 they lead to) never reach the statistics."""
    tokenizer = models.load_tokenizer("minilm")
    sentences = models.data.sentences("calib")[:64]
    unpadded, padded = tmp_path / "unpadded", tmp_path / "padded"
    models.data.save_feeds_npz(models.data.encoder_feeds(tokenizer, sentences), unpadded)
    models.data.save_feeds_npz(models.data.encoder_feeds(tokenizer, sentences, batch_size=32, pad=True), padded)
    outs = []
    for calib in (unpadded, padded):
        out = tmp_path / f"{calib.name}.onnx"
        _compile([minilm, "--w8a8", "--calib-data", calib, "--calib-method", "minmax", "-o", out])
        outs.append({t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer if t.name.endswith(".scale")})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) == 24
    for name in outs[0]:
        np.testing.assert_allclose(outs[0][name], outs[1][name], rtol=1e-5)


def test_mobilenet_static_w8a8(tmp_path):
    float_path = models.export("mobilenetv2").onnx_path
    calib = tmp_path / "calib.npz"
    models.data.save_feeds_npz(models.data.model_feeds("mobilenetv2", "calib"), calib)
    out = tmp_path / "mobilenet.w8a8.onnx"
    _compile([float_path, "--w8a8", "--calib-data", calib, "-o", out])
    _check_output(float_path, out)
    from qcompiler.evaluate import image_metrics
    from runtime.session import create_session

    f, q = create_session(float_path), create_session(out)
    photos = models.data.image_feeds("eval", crops=False)
    assert image_metrics(f, q, photos)["top-1 agreement"] == 1.0  # every photo
    assert image_metrics(f, q, models.data.image_feeds("eval", crops=True))["top-1 agreement"] >= 0.95


@pytest.mark.slow
def test_smollm2_per_token_perplexity(tmp_path):
    float_path = models.export("smollm2").onnx_path
    out = tmp_path / "smollm2.w8a8.onnx"
    _compile([float_path, "--w8a8", "-o", out])
    _check_output(float_path, out)
    result = _eval(float_path, out, "lm", tmp_path, "--limit", "16")
    assert result["metrics"]["windows"] == 16
    assert result["metrics"]["perplexity ratio"] <= 1.03


def test_minilm_static_from_calibration_text(minilm, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(models.data.sentences("calib")[:48]), encoding="utf-8")
    tokenizer_dir = models.export("minilm").tokenizer_dir
    out = tmp_path / "minilm.text.onnx"
    _compile([minilm, "--w8a8", "--calib-text", text, "--tokenizer", tokenizer_dir, "-o", out])
    result = _eval(minilm, out, "embedding", tmp_path, "--limit", "60")
    assert result["metrics"]["mean cosine (unpadded)"] >= 0.99


def test_language_model_calibration_text_gives_token_windows(tmp_path):
    """--calib-text on a model with a single input_ids input cuts the text into windows."""
    from onnx import TensorProto, helper

    from qcompiler import calib_data
    from qcompiler.ir_utils import load_model
    from tests import graphs

    tokenizer_dir = models.export("minilm").tokenizer_dir
    vocab = len(models.load_tokenizer("minilm"))
    rng = np.random.default_rng(0)
    proto = graphs.make_model(
        [helper.make_node("Gather", ["embedding", "input_ids"], ["h"]),
         helper.make_node("MatMul", ["h", "head"], ["logits"])],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 16])],
        {"embedding": rng.normal(size=(vocab, 8)).astype(np.float32), "head": rng.normal(size=(8, 16)).astype(np.float32)},
    )
    path = tmp_path / "lm.onnx"
    onnx.save(proto, path)
    text = tmp_path / "wiki.txt"
    text.write_text(" ".join(models.data.sentences("calib")), encoding="utf-8")
    windows = list(calib_data.text_source(text, tokenizer_dir, calib_data.input_specs(load_model(path)), seq_len=64)())
    assert len(windows) >= 10 and all(w["input_ids"].shape == (1, 64) for w in windows)
    out = tmp_path / "lm.w8a8.onnx"
    _compile([path, "--w8a8", "--calib-text", text, "--tokenizer", tokenizer_dir, "--seq-len", "64", "-o", out])
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(out).graph.node}


def test_eval_on_the_wrong_task_is_one_line_and_exit_2(tmp_path, capsys):
    float_path = models.export("mobilenetv2").onnx_path
    assert main(["eval", str(float_path), str(float_path), "--task", "lm", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot evaluate" in err[0]
