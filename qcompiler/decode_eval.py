"""Token-by-token evaluation of a decoder graph with past key/values (``models.smollm2_decode``).

``decode_perplexity`` runs each window one token at a time: step ``t`` feeds token ``t``, an
attention mask of ``t + 1`` ones and the cache the previous step returned — exactly as it came
out (ONNX Runtime ``OrtValue``s, so an int8 or float8 cache with its scales is fed back
unconverted) — and scores the logits against token ``t + 1``. It counts the same ``T − 1``
predictions per window as ``evaluate.perplexity`` does on the whole window at once, so the
float decoder's figure equals the cache-free model's up to float rounding.

``cache_bytes_per_token``: bytes one token adds to the cache, from the graph's ``present.*``
outputs (heads × last dimension × element size, scales included).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from qcompiler.errors import QCompileError
from qcompiler.evaluate import token_nll
from runtime.session import create_session

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
_ELEMENT = {  # ONNX Runtime type string → (TensorProto type, bytes, numpy dtype of the bits)
    "tensor(float)": (TensorProto.FLOAT, 4, np.float32),
    "tensor(float16)": (TensorProto.FLOAT16, 2, np.float16),
    "tensor(int8)": (TensorProto.INT8, 1, np.int8),
    "tensor(float8e4m3fn)": (TensorProto.FLOAT8E4M3FN, 1, np.uint8),
}


@dataclasses.dataclass
class DecodeResult:
    perplexity: float
    tokens: int
    windows: int
    cache_bytes_per_token: int
    ms_per_step: float


def cache_bytes_per_token(session: ort.InferenceSession) -> int:
    """Bytes one token adds to the cache (``present.*`` outputs: heads × last dim × size)."""
    total = 0
    for out in session.get_outputs():
        if out.name.startswith(PRESENT_PREFIX):
            heads, width = out.shape[1], out.shape[3]
            if not isinstance(heads, int) or not isinstance(width, int):
                raise QCompileError(f"cache output {out.name} has no fixed head count/width: {out.shape}")
            total += heads * width * _ELEMENT[out.type][1]
    return total


def _empty_cache(session: ort.InferenceSession, batch: int) -> dict[str, ort.OrtValue]:
    feed = {}
    for spec in session.get_inputs():
        if not spec.name.startswith(PAST_PREFIX):
            continue
        if spec.type not in _ELEMENT:
            raise QCompileError(f"unsupported cache input type {spec.type} for {spec.name}")
        onnx_type, _, bits = _ELEMENT[spec.type]
        shape = (batch, spec.shape[1], 0, spec.shape[3])
        feed[spec.name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.zeros(shape, bits), onnx_type)
    if not feed:
        raise QCompileError("this graph has no past_key_values.* inputs: token-by-token evaluation needs a "
                            "decoder with a KV cache (`qcompile models export smollm2-decode`)")
    return feed


def decode_perplexity(path, windows: Iterable[np.ndarray], threads: int = 2) -> DecodeResult:
    """Perplexity of ``windows`` (``[1, T]`` token ids) fed one token at a time through the
    decoder at ``path``, the cache it returns fed back each step."""
    session = create_session(path, threads=threads)
    _empty_cache(session, 1)  # refuses a graph without a cache
    outputs = [o.name for o in session.get_outputs()]
    if "logits" not in outputs:
        raise QCompileError(f"the decoder has no 'logits' output (outputs: {', '.join(outputs[:4])}…)")
    logits_index = outputs.index("logits")
    presents = [(i, name.replace(PRESENT_PREFIX, PAST_PREFIX, 1)) for i, name in enumerate(outputs)
                if name.startswith(PRESENT_PREFIX)]
    total_nll, total_tokens, count, steps, seconds = 0.0, 0, 0, 0, 0.0
    for ids in windows:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        cache = _empty_cache(session, 1)
        for t in range(ids.shape[1] - 1):
            feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids[:, t:t + 1]),
                    "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, t + 1), np.int64)), **cache}
            start = time.perf_counter()
            result = session.run_with_ort_values(outputs, feed)
            seconds += time.perf_counter() - start
            steps += 1
            cache = {name: result[i] for i, name in presents}
            total_nll += float(token_nll(result[logits_index].numpy()[0, -1], ids[0, t + 1]))
            total_tokens += 1
        count += 1
    return DecodeResult(
        perplexity=math.exp(total_nll / max(total_tokens, 1)),
        tokens=total_tokens,
        windows=count,
        cache_bytes_per_token=cache_bytes_per_token(session),
        ms_per_step=1e3 * seconds / max(steps, 1),
    )
