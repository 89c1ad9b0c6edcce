import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QCOMPILE_SLOW") != "1":
        skip = pytest.mark.skip(reason="slow: set QCOMPILE_SLOW=1 to run")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    if "CUDAExecutionProvider" not in _providers():
        skip_gpu = pytest.mark.skip(reason="gpu: ONNX Runtime's CUDA provider is not available")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


def _providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()
