"""ONNX Runtime sessions with qcompile's defaults and one-line errors."""

from __future__ import annotations

import os

import onnxruntime as ort

from qcompiler.errors import QCompileError, first_line
from runtime import custom_ops, float8

CPU = "CPUExecutionProvider"


def session_options(threads: int | None = None, optimize: bool = True) -> ort.SessionOptions:
    """Options for a session: ``threads`` intra-op threads (None: ORT's default), one inter-op
    thread, full graph optimisation (where ORT fuses QDQ into integer kernels) or none."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    return options


def create_session(
    model: str | os.PathLike | bytes,
    threads: int | None = None,
    providers: tuple[str, ...] = (CPU,),
    optimize: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession, or a QCompileError saying why ONNX Runtime refused the model."""
    source = model if isinstance(model, bytes) else os.fspath(model)
    options = session_options(threads, optimize)
    readable = isinstance(source, bytes) or os.path.isfile(source)
    if readable and custom_ops.imports_domain(source):  # qcompile's own ops: load the library
        custom_ops.register(options, cuda="CUDAExecutionProvider" in providers)
    if optimize and readable and float8.marked(source):  # ORT's QDQ fusions break float8 Q/DQ
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except Exception as exc:
        raise QCompileError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc
