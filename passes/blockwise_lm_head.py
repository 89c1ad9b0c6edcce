"""Run a language model's LM head with 8-bit activations per block instead of per token.

The MatMul producing the logits (a graph output; in small LMs the table tied to the embedding)
is the most sensitive layer of a W8A8 language model: with one activation scale per token,
SmolLM2 loses half its perplexity budget there (×1.0105 with it, ×1.0056 with it in float).
ONNX Runtime's ``MatMulNBits`` at ``accuracy_level=4`` quantizes the activations to int8 per
block of ``b`` input channels (one scale per token and block) and accumulates in integers::

    y_t = Σ_blocks s^x_{t,k} s^w_{k,n} Σ_{j∈block} x^q_{t,j} w^q_{j,n}

With int8 symmetric per-channel weights this is W8A8 with finer activation scales: SmolLM2
per-token + SmoothQuant ×1.0063, same size, same speed. The head leaves the W8A8 targets
(``TARGET_KEY`` removed) and gets a ``PackedWeight`` for ``EmitMatMulNBitsPass``.
"""

from __future__ import annotations

import onnx_ir as ir

from passes.quantize_weight_only import is_lm_head, rtn
from passes.select_targets import TARGET_KEY, targets
from qcompiler import quant_math as qm
from qcompiler.packed_weight import WEIGHT_KEY

HEAD_FORMAT = qm.WeightFormat(bits=8, group_size=None, symmetric=True)


class BlockwiseLMHeadPass(ir.passes.InPlacePass):
    """Hand the LM head's MatMul from the W8A8 passes to the block-wise int8 kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        heads = [t for t in targets(model) if t.op_type == "MatMul" and t.channel_axis == 1 and is_lm_head(t.node)]
        for target in heads:
            del target.node.meta[TARGET_KEY]
            target.node.meta[WEIGHT_KEY] = rtn(target.weight, HEAD_FORMAT)
        self.summary = f"{heads[0].node.name}: int8 activations per block" if heads else "no LM head"
        return ir.passes.PassResult(model, modified=False)  # annotations; the emitter rewrites
