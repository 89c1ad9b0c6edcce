"""The small top-level fields of an ONNX file, read without parsing the graph or its weights.

A ``ModelProto`` is a sequence of (tag, value) pairs; the graph (field 7), which holds the
weights, is one length-delimited value that is skipped by its length. What is kept: the opset
imports (field 8) and the metadata properties (field 14). Sessions use it to decide how to
load a model (custom-op library, float8 optimisation level) before ONNX Runtime reads it.
"""

from __future__ import annotations

import dataclasses
import io
import os

_OPSET_IMPORT, _METADATA = 8, 14


@dataclasses.dataclass
class ModelHeader:
    domains: set[str] = dataclasses.field(default_factory=set)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def read_header(model: str | os.PathLike | bytes) -> ModelHeader:
    """Opset domains and metadata of a model file or serialized model."""
    if isinstance(model, bytes):
        return _scan(io.BytesIO(model))
    with open(model, "rb") as stream:
        return _scan(stream)


def _varint(stream) -> int | None:
    shift = result = 0
    while True:
        byte = stream.read(1)
        if not byte:
            return None
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7


def _scan(stream) -> ModelHeader:
    import onnx

    header = ModelHeader()
    while (tag := _varint(stream)) is not None:
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _varint(stream)
        elif wire in (1, 5):
            stream.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            length = _varint(stream) or 0
            if field == _OPSET_IMPORT:
                header.domains.add(onnx.OperatorSetIdProto.FromString(stream.read(length)).domain)
            elif field == _METADATA:
                entry = onnx.StringStringEntryProto.FromString(stream.read(length))
                header.metadata[entry.key] = entry.value
            else:
                stream.seek(length, 1)
        else:  # not a protobuf we understand: let ONNX Runtime report it
            break
    return header
