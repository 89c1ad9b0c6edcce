"""The HTML diff report: self-contained, with its charts; rendered by headless Chromium (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from graphs import mlp
from qcompiler.cli import main


@pytest.fixture
def report(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp(), a)
    assert main([str(a), "--w8a8", "-o", str(b), "--quiet"]) == 0
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(2, 1, 3, 32)).astype(np.float32))
    page = tmp_path / "report.html"
    assert main(["diff", str(a), str(b), "--data", str(tmp_path / "d.npz"), "--html", str(page)]) == 0
    return page


def test_page_is_self_contained_with_charts(report):
    text = report.read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", text) and "<script" not in text
    assert text.count("class='bar'") == 2  # one bar per quantized layer (fc1, fc2)
    assert text.count("class='histogram'") == 2  # the activations entering both layers
    assert text.count("class='subgraph'") == 2  # the worst layer before and after
    assert "Layer fc" in text


@pytest.mark.slow
def test_chromium_renders_the_page(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1000,1400", f"--screenshot={shot}", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from PIL import Image  # scikit-image's dependency (the models extra)

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    bar_colours = np.array([[0x5C, 0xB8, 0x5C], [0xF0, 0xAD, 0x4E], [0xD9, 0x53, 0x4F]])
    drawn = sum(int((pixels == c).all(axis=1).sum()) for c in bar_colours)
    assert drawn > 200  # the SQNR bars are painted, not just the text
