"""Shared helpers for pass tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(proto)


def run(model: ir.Model | onnx.ModelProto, feed: dict, optimize: bool = False) -> list[np.ndarray]:
    """Run in ONNX Runtime; optimisations off by default so ORT's own fusions hide nothing."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]
