"""Models holding float8 Q/DQ and ONNX Runtime's CPU graph optimisations.

ONNX Runtime 1.31's CPU QDQ fusions take a float8 ``Q → DQ → MatMul`` for an integer one: at
the default level (``ORT_ENABLE_ALL``) the session fails to load (``QLinearMatMul`` /
``MatMulIntegerToFloat`` given float8 inputs) and with ``session.disable_quant_qdq=1`` it loads
but computes wrong numbers. ``ORT_ENABLE_BASIC`` (constant folding, redundant-node removal)
runs the Q/DQ graph exactly, so sessions for such models are created at that level.

``qcompile --fp8`` marks its outputs with the metadata ``qcompile.float8_qdq = 1``;
``marked`` finds the mark by scanning the file's top-level protobuf fields (metadata is field
14), skipping the graph and weights by their length — no parse of the model.
"""

from __future__ import annotations

import io
import os

METADATA_KEY = "qcompile.float8_qdq"


def marked(model: str | os.PathLike | bytes) -> bool:
    """Whether the model's metadata carries ``qcompile.float8_qdq = 1``."""
    if isinstance(model, bytes):
        return _scan(io.BytesIO(model))
    with open(model, "rb") as stream:
        return _scan(stream)


def _scan(stream) -> bool:
    import onnx

    def varint() -> int | None:
        shift = result = 0
        while True:
            byte = stream.read(1)
            if not byte:
                return None
            result |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return result
            shift += 7

    while (tag := varint()) is not None:
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            varint()
        elif wire in (1, 5):
            stream.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            length = varint() or 0
            if field == 14:
                entry = onnx.StringStringEntryProto.FromString(stream.read(length))
                if entry.key == METADATA_KEY and entry.value == "1":
                    return True
            else:
                stream.seek(length, 1)
        else:
            break
    return False
