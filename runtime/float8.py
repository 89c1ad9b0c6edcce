"""Models holding float8 Q/DQ and ONNX Runtime's CPU graph optimisations.

ONNX Runtime 1.31's CPU QDQ fusions take a float8 ``Q → DQ → MatMul`` for an integer one: at
the default level (``ORT_ENABLE_ALL``) the session fails to load (``QLinearMatMul`` /
``MatMulIntegerToFloat`` given float8 inputs) and with ``session.disable_quant_qdq=1`` it loads
but computes wrong numbers. ``ORT_ENABLE_BASIC`` (constant folding, redundant-node removal)
runs the Q/DQ graph exactly, so sessions for such models are created at that level.

``qcompile --fp8`` marks its outputs with the metadata ``qcompile.float8_qdq = 1``;
``marked`` finds the mark in the file's header (``runtime.model_header``): no parse of the model.
"""

from __future__ import annotations

import os

from runtime.model_header import read_header

METADATA_KEY = "qcompile.float8_qdq"


def marked(model: str | os.PathLike | bytes) -> bool:
    """Whether the model's metadata carries ``qcompile.float8_qdq = 1``."""
    return read_header(model).metadata.get(METADATA_KEY) == "1"
