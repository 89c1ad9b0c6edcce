"""Default evaluation sets for ``qcompile eval`` (held apart from calibration by
``models.data``), or a user's own ``--data`` file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompiler import calib_data
from qcompiler.errors import QCompileError
from qcompiler.evaluate import EvalData

EMBEDDING_PAD_BATCH = 32
LATENCY_TOKENS = 128
LM_WINDOWS = 16


def _models():
    try:
        import models
        import models.data
    except ImportError as exc:
        raise QCompileError(
            f"the default evaluation data needs the models extra ({exc}); "
            "install qcompile[models] or pass --data"
        ) from exc
    return models


def default_eval_data(task: str, tokenizer_dir: str | Path | None = None, limit: int | None = None) -> EvalData:
    """The held-apart evaluation set of the reference data for ``task``."""
    models = _models()
    data = models.data
    if task == "embedding":
        tokenizer = _tokenizer(models, "minilm", tokenizer_dir)
        sentences = data.sentences("eval")[:limit]
        unpadded = data.encoder_feeds(tokenizer, sentences, batch_size=1)
        padded = data.encoder_feeds(tokenizer, sentences, batch_size=EMBEDDING_PAD_BATCH, pad=True)
        return EvalData(unpadded, padded, latency_feeds=_encoder_latency_feeds(tokenizer, sentences))
    if task == "lm":
        tokenizer = _tokenizer(models, "smollm2", tokenizer_dir)
        windows = [{"input_ids": w} for w in data.lm_windows(tokenizer, "eval", n=limit or LM_WINDOWS)]
        return EvalData(windows, latency_feeds={"1×512 tokens": windows[0]})
    photos = data.image_feeds("eval", crops=False)
    names = data.image_names("eval")
    labelled = [(f, data.IMAGE_LABELS[n]) for n, f in zip(names, photos) if n in data.IMAGE_LABELS]
    feeds = data.image_feeds("eval", crops=True)[:limit]
    batch16 = {"image": np.concatenate([f["image"] for f in feeds[:16]], axis=0)}
    return EvalData(feeds, labelled=labelled, latency_feeds={"batch 1": feeds[0], "batch 16": batch16})


def _tokenizer(models, name: str, tokenizer_dir):
    if tokenizer_dir is not None:
        return calib_data.load_tokenizer(tokenizer_dir)
    return models.load_tokenizer(name)


def _encoder_latency_feeds(tokenizer, sentences: list[str]) -> dict:
    """Real tokens packed into ``[1, 128]`` and ``[32, 128]`` unpadded inputs."""
    ids = np.concatenate(
        [tokenizer(s, add_special_tokens=False, return_tensors="np")["input_ids"][0] for s in sentences]
    ).astype(np.int64)
    feeds = {}
    for batch in (1, EMBEDDING_PAD_BATCH):
        need = batch * LATENCY_TOKENS
        tokens = np.resize(ids, need).reshape(batch, LATENCY_TOKENS)
        feeds[f"{batch}×{LATENCY_TOKENS} tokens"] = {
            "input_ids": tokens,
            "attention_mask": np.ones_like(tokens),
            "token_type_ids": np.zeros_like(tokens),
        }
    return feeds


def npz_eval_data(path: str | Path, specs: list[calib_data.InputSpec]) -> EvalData:
    """Evaluation feeds from a user's .npz file or folder (same format as --calib-data)."""
    feeds = list(calib_data.npz_source(path, specs)())
    return EvalData(feeds, latency_feeds={"first sample": feeds[0]})
