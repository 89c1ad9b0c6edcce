"""SIGINT or SIGTERM in the middle of calibration: exit 130 (SIGINT) or 143 (SIGTERM), one line
on stderr, no output, no temporary files (ours live in TMPDIR and beside the output), and the
input untouched. Run as a subprocess on the small mlp with 20,000 calibration samples (about
10 s of calibration; the signal comes 0.3 s after calibration starts)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests import graphs

ROOT = Path(__file__).resolve().parents[2]


def _ours(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "qcompile" in p.name)


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_during_calibration_leaves_nothing(tmp_path, sig, code, name):
    model = tmp_path / "m.onnx"
    onnx.save(graphs.mlp(), model)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(20000, 1, 4, 32)).astype(np.float32))
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    tmpdir, out = tmp_path / "tmp", tmp_path / "out"
    tmpdir.mkdir()
    out.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    env.pop("QCOMPILE_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcompiler.cli", str(model), "--w8a8", "--calib-data", str(calib),
         "-o", str(out / "o.onnx"), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell running this suite in the background ignores SIGINT for its children, and a
        # Python started with SIGINT ignored keeps ignoring it: restore the default first.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not _ours(tmpdir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # calibration writes its augmented model to TMPDIR/qcompile-calib-*
    assert proc.poll() is None, "the compile ended before calibration was seen"
    assert _ours(tmpdir)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qcompile: interrupted by {name}"), lines
    assert list(out.iterdir()) == []
    assert _ours(tmpdir) == []
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
