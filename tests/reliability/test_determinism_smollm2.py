"""Two compiles of SmolLM2 ``--w8a8`` with the same inputs give byte-identical files (slow: the
reference export and two compiles). The fast version, on the mlp, is in test_integrity.py."""

from __future__ import annotations

import hashlib

import pytest

from qcompiler.cli import main


@pytest.mark.slow
def test_smollm2_w8a8_compiles_are_byte_identical(tmp_path):
    models = pytest.importorskip("models")
    model = models.export("smollm2").onnx_path
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run / "smollm2.w8a8.onnx"
        out.parent.mkdir()
        assert main([str(model), "--w8a8", "-o", str(out), "--quiet"]) == 0
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.parent.iterdir())})
    assert digests[0] == digests[1]
