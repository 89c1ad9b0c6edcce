"""Every case of the generated bad-input corpus (``bad_inputs.py``) ends with exit code 2 and one
line on stderr saying what is wrong — or, for valid but unusual input, compiles (exit 0) and
says what it left untouched. Never a traceback, never an internal error (exit 1)."""

from __future__ import annotations

import collections
import hashlib

import onnx
import pytest

from qcompiler.cli import main
from tests.reliability import bad_inputs

CASES = bad_inputs.cases()


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def test_corpus_is_large_and_covers_every_command():
    counts = collections.Counter(c.expect for c in CASES)
    assert len(CASES) >= 200 and len({c.id for c in CASES}) == len(CASES)
    assert counts[bad_inputs.ERROR] >= 200 and counts[bad_inputs.OK] >= 20, counts
    kinds = collections.Counter(c.id.split("/")[-1] for c in CASES if "/" in c.id)
    assert all(kinds[k] >= 20 for k in ("dyn", "static", "rtn", "plan", "eval")), kinds


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, corpus_root, capfd, monkeypatch):
    monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)
    argv = case.argv(corpus_root)
    model = next((corpus_root / a for a in argv if a.endswith(".onnx") and (corpus_root / a).is_file()), None)
    before = _digest(model) if model is not None else None
    out_folder = corpus_root / "out"
    code = main(argv)
    captured = capfd.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err
    if case.expect == bad_inputs.EITHER and code == 0:
        pass
    elif case.expect == bad_inputs.OK:
        assert code == 0, captured.err
        if argv and argv[0] not in ("plan", "eval"):
            assert captured.out.startswith("wrote "), captured.out
            output = argv[argv.index("-o") + 1]
            onnx.checker.check_model(output)
    else:
        assert code == 2, (code, captured.err)
        assert len(err_lines) == 1, err_lines
        assert err_lines[0].startswith("qcompile: error: ") and len(err_lines[0]) > len("qcompile: error: ") + 10
        if case.fragment:
            assert case.fragment in err_lines[0], err_lines[0]
    if model is not None:
        assert _digest(model) == before, "the input model was modified"
    if out_folder.exists():
        assert not [p.name for p in out_folder.iterdir() if p.name.startswith(".qcompile")]


def test_unusual_inputs_say_what_they_left(corpus_root, capfd):
    custom = bad_inputs._proto_file("custom_op.onnx", bad_inputs._unusual_models()["custom_op.onnx"])(corpus_root)
    plain = bad_inputs._proto_file("no_quantizable_op.onnx", bad_inputs._unusual_models()["no_quantizable_op.onnx"])(corpus_root)
    assert main([str(custom), "--w8a8", "-o", str(corpus_root / "c.onnx"), "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "custom ops left as they are" in err and "com.example.Swish" in err
    out = onnx.load(corpus_root / "c.onnx")
    assert [n.op_type for n in out.graph.node if n.domain == "com.example"] == ["Swish"]
    assert main([str(plain), "--w4a16", "--method", "rtn", "-o", str(corpus_root / "p.onnx"), "--quiet"]) == 0
    assert "no weighted op was quantized" in capfd.readouterr().err
    assert sorted(n.op_type for n in onnx.load(corpus_root / "p.onnx").graph.node) == ["Add", "Relu"]


def test_every_recipe_flag_is_checked_for_conflicts():
    """Recipe flags share one destination; the conflict check must know each of them."""
    from qcompiler.cli import RECIPE_FLAGS, cli

    flags = {o for p in cli.commands["compile"].params if p.name == "recipe" for o in p.opts}
    assert flags == set(RECIPE_FLAGS)
