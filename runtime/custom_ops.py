"""qcompile's custom-op library for ONNX Runtime (``runtime/csrc``, domain ``qcompile``).

``Int4MatMul`` (W4A16) and ``MixedInt8MatMul`` (LLM.int8()) have CPU kernels (reference and
fallback; ``make runtime`` builds them into ``build/runtime/libqcompile_ops.so``) and CUDA
kernels (``make runtime-cuda`` on a GPU machine: ``build/runtime-cuda/libqcompile_ops.so``, which
holds both). ``QCOMPILE_OPS_LIBRARY`` names another build. Sessions register the library
automatically when a model imports the ``qcompile`` domain (``runtime.session``).

Op contracts (``runtime/csrc/kernels.h``)::

    Int4MatMul(A: T[..., K], B: uint8[N, ceil(K/g), g/2], scales: fp16[N, ceil(K/g)],
               zero_points: fp16[N, ceil(K/g)]) -> T[..., N]       attributes K, N, group_size
        W[k, n] = scales[n, k//g] · (u[k, n] − zero_points[n, k//g]), u the 4-bit code of
        (k, n) (even k in the low nibble)

    MixedInt8MatMul(X: T[..., K], weight_q: int8[N, K], weight_scale: float[N],
                    outlier_index: int64[O], weight_outlier: fp16[O, N]) -> T[..., N]
        X' = X with the outlier channels zeroed, s_x = max(max_k |X'|, 1e-8)/127 per row,
        Y = s_x · s_w[n] · Σ_k round(X'/s_x) · weight_q[n, k] + Σ_i X[:, O_i] · weight_outlier[i, n]

T is float32 or float16.
"""

from __future__ import annotations

import os
from pathlib import Path

from qcompiler.errors import QCompileError

DOMAIN = "qcompile"
ROOT = Path(__file__).resolve().parents[1]
LIBRARY_NAME = "libqcompile_ops.so"
CPU_BUILD = ROOT / "build" / "runtime" / LIBRARY_NAME
CUDA_BUILD = ROOT / "build" / "runtime-cuda" / LIBRARY_NAME
ENV = "QCOMPILE_OPS_LIBRARY"


def library_path(cuda: bool = False) -> Path | None:
    """The library to load (None: not built). ``cuda``: prefer the CUDA build."""
    override = os.environ.get(ENV)
    if override:
        return Path(override)
    candidates = (CUDA_BUILD, CPU_BUILD) if cuda else (CPU_BUILD, CUDA_BUILD)
    return next((p for p in candidates if p.exists()), None)


def available() -> bool:
    """Whether the library is built (the emitters fall back to standard ops otherwise)."""
    path = library_path()
    return path is not None and path.exists()


def require_library(cuda: bool = False) -> Path:
    """The library's path, or a QCompileError saying how to build it."""
    path = library_path(cuda)
    if path is None or not path.exists():
        where = path or CPU_BUILD
        raise QCompileError(
            f"the model uses qcompile's custom ops but {where} is not built: run `make runtime` "
            f"(CPU) or `make runtime-cuda` (GPU), or set {ENV}")
    return path


def register(options, cuda: bool = False) -> None:
    """Register the library with ``onnxruntime.SessionOptions``."""
    path = require_library(cuda)
    try:
        options.register_custom_ops_library(os.fspath(path))
    except Exception as exc:
        raise QCompileError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc


def imports_domain(model: str | os.PathLike | bytes) -> bool:
    """Whether a model (a path or serialized bytes) imports the ``qcompile`` domain, read from
    the file's header (``runtime.model_header``) without parsing the graph."""
    from runtime.model_header import read_header

    return DOMAIN in read_header(model).domains
