"""SmolLM2 with a KV cache (slow: export ~100 s, then token-by-token runs) and SmolLM2 --fp8."""

import numpy as np
import pytest
import torch

import models
from models import data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def decoder():
    return models.export("smollm2-decode")


@pytest.fixture(scope="module")
def windows():
    return data.lm_windows(models.load_tokenizer("smollm2"), "eval", n=2)


def test_decode_graph_matches_torch_prefill_then_steps(decoder, windows):
    from models import smollm2
    from runtime.session import create_session

    session = create_session(decoder.onnx_path, threads=2)
    names = [o.name for o in session.get_outputs()]
    ids = windows[0][:, :24]
    with torch.no_grad():
        expected = smollm2.load_torch_model()(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    past = {i.name: np.zeros((1, 3, 0, 64), np.float32) for i in session.get_inputs() if i.name.startswith("past")}
    assert len(past) == 60
    got = []
    for start, stop in ((0, 16), *((t, t + 1) for t in range(16, 24))):  # prefill 16, then 8 single steps
        out = dict(zip(names, session.run(None, {"input_ids": ids[:, start:stop],
                                                 "attention_mask": np.ones((1, stop), np.int64), **past})))
        got.append(out["logits"])
        past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
        assert past["past_key_values.29.value"].shape == (1, 3, stop, 64)
    got = np.concatenate(got, axis=1)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_kv_cache_perplexity_token_by_token_within_one_percent(decoder, windows, dtype, tmp_path):
    from qcompiler.config import KVCacheConfig
    from qcompiler.decode_eval import decode_perplexity
    from qcompiler.pipeline import compile_model

    short = [w[:, :160] for w in windows]
    out = tmp_path / f"decode.kv-{dtype}.onnx"
    compile_model(decoder.onnx_path, out, KVCacheConfig(dtype), progress=False)
    base, quant = decode_perplexity(decoder.onnx_path, short), decode_perplexity(out, short)
    assert quant.cache_bytes_per_token == 30 * 2 * 3 * (64 + 2) and base.cache_bytes_per_token == 30 * 2 * 3 * 64 * 4
    assert base.tokens == quant.tokens == 2 * 159
    assert quant.perplexity <= 1.01 * base.perplexity


def test_smollm2_fp8_perplexity_close_to_fp32(tmp_path):
    from qcompiler.config import CalibrationConfig, FP8Config
    from qcompiler.evaluate import perplexity
    from qcompiler.pipeline import compile_model
    from runtime.session import create_session

    reference = models.export("smollm2")
    calib = data.model_feeds("smollm2", "calib", 8)
    out = tmp_path / "smollm2.fp8.onnx"
    compile_model(reference.onnx_path, out, FP8Config(calibration=CalibrationConfig(method="minmax")),
                  feeds=lambda: calib, progress=False)
    feeds = [{"input_ids": w} for w in data.lm_windows(models.load_tokenizer("smollm2"), "eval", n=4)]
    base = perplexity(create_session(reference.onnx_path, threads=2), feeds)
    quant = perplexity(create_session(out, threads=2), feeds)
    # E4M3 weights and static per-tensor activations do not reach the 1.01 on this
    # 135M model: ×1.016 on 16 windows with 32 calibration windows (README); here fewer of both.
    assert quant <= 1.025 * base
