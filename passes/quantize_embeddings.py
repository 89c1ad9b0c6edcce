"""Store large embedding tables as int8 with one scale per row, dequantizing only the rows read.

For ``Y = Gather(T, ids)`` with a constant float table ``T: [V, D]`` (axis 0)::

    s_v = max_d |T[v, d]| / 127        T^q = round(T / s_v)            (int8, [-127, 127])
    Y   = Cast(Gather(T^q, ids)) · Gather(s, ids)                     (s stored as [V, 1])

Only the ``B·S`` rows looked up are converted, never the whole table. In small language
models the tables are a large share of the bytes (SmolLM2: 113 MB of 540; MiniLM: 47 MB of 91).
Tables under ``min_bytes`` (position and token-type embeddings) stay float: they save little.
If the float table is also read elsewhere (an LM head tied through a Transpose), that reader
keeps its own copy — the LM head is quantized as a MatMul weight by ``QuantizeWeightsPass``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.quantize_weights import quantize_weight
from qcompiler import ir_utils

EMBEDDING_KEY = "qcompile.embedding"
MIN_TABLE_BYTES = 1 << 20


def _table(node: ir.Node, min_bytes: int) -> np.ndarray | None:
    """The node's constant float32 table when it is an axis-0 Gather worth quantizing."""
    if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
        return None
    table = ir_utils.constant_array(node.inputs[0])
    if table is None or table.dtype != np.float32 or table.ndim != 2 or table.nbytes < min_bytes:
        return None
    if ir_utils.constant_array(node.inputs[1]) is not None:
        return None  # constant indices: constant folding's business, not ours
    return table


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Replace each large constant-table Gather by an int8 Gather and a per-row rescale."""

    def __init__(self, min_bytes: int = MIN_TABLE_BYTES) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, saved = model.graph, 0
        quantized: dict[int, tuple[ir.Value, ir.Value]] = {}
        for node in tuple(graph):
            table = _table(node, self.min_bytes)
            if table is None or EMBEDDING_KEY in node.meta:
                continue
            key = id(node.inputs[0])
            if key not in quantized:
                quantized[key] = self._store(graph, node.inputs[0].name or "embedding", table)
                saved += table.nbytes - table.size - table.shape[0] * 4
            self._lower(graph, node, *quantized[key])
        self.summary = f"{len(quantized)} tables to int8 (−{saved / 1e6:.1f} MB)" if quantized else ""
        return ir.passes.PassResult(model, modified=bool(quantized))

    @staticmethod
    def _store(graph: ir.Graph, stem: str, table: np.ndarray) -> tuple[ir.Value, ir.Value]:
        rows = quantize_weight(table, channel_axis=0)  # per row, symmetric [-127, 127]
        q = ir_utils.initializer(graph, f"{stem}.q", rows.q)
        scale = ir_utils.initializer(graph, f"{stem}.row_scale", rows.scale.reshape(-1, 1))
        return q, scale

    @staticmethod
    def _lower(graph: ir.Graph, node: ir.Node, table_q: ir.Value, row_scale: ir.Value) -> None:
        ids = node.inputs[1]
        b = ir_utils.NodeBuilder(graph, node, node.name or node.outputs[0].name or "embedding")
        rows = b.op("Cast", [b.op("Gather", [table_q, ids], "gather_q", axis=0)], "to_float", to=ir.DataType.FLOAT)
        scales = b.op("Gather", [row_scale, ids], "gather_scale", axis=0)
        ir_utils.replace_output(node.outputs[0], b.op("Mul", [rows, scales], "rescale"))
        for new in b.created:  # the row-scale Gather must not look like a table next time
            new.meta[EMBEDDING_KEY] = True
