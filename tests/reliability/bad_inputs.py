"""A generated corpus of bad (and valid-but-unusual) inputs for the ``qcompile`` command line.

``cases()`` lists the cases (cheap: no files); ``Case.argv(root)`` writes the files a case
needs under ``root`` (once per name) and returns its argument list. Every case expects one of:

* ``ERROR``: exit code 2 and exactly one stderr line ``qcompile: error: …`` (with ``fragment``
  in it when given);
* ``OK``: exit code 0 — valid input that is only unusual (custom ops, unknown shapes, no
  quantizable op): what can be compiled is, the rest is left untouched;
* ``EITHER``: a corrupted file that may still parse as a valid model (a bit flipped inside a
  weight, a protobuf truncated at a field boundary): exit 0 or the ``ERROR`` contract, never a
  traceback or an internal error.

Base models come from ``tests.graphs`` (built with onnx.helper, independent of the code under
test); the corruptions are deterministic (seeded).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests import graphs

ERROR, OK, EITHER = "error", "ok", "either"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    expect: str
    build: Callable[[Path], list[str]]  # root folder → argv
    fragment: str | None = None

    def argv(self, root: Path) -> list[str]:
        return self.build(root)


# --- files ----------------------------------------------------------------------------------


def _once(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    path = root / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return path


def _bytes_file(name: str, data: bytes) -> Callable[[Path], Path]:
    return lambda root: _once(root, name, lambda p: p.write_bytes(data))


def _proto_file(name: str, make: Callable[[], onnx.ModelProto]) -> Callable[[Path], Path]:
    return lambda root: _once(root, name, lambda p: p.write_bytes(make().SerializeToString()))


def _unchecked(nodes, inputs, outputs, inits, opset=graphs.OPSET, ir_version=10, domains=()):
    """A model built without the checker (so that it may be invalid on purpose)."""
    graph = helper.make_graph(nodes, "bad", inputs, outputs,
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version
    return model


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


_W = np.random.default_rng(1).normal(0, 0.2, (32, 32)).astype(np.float32)


def _linear(nodes_between=(), x_shape=("B", "S", 32), y_shape=("B", "S", 32), opset=graphs.OPSET,
            ir_version=10, domains=(), w=_W, x_dtype=TensorProto.FLOAT):
    """x → MatMul(w) → [nodes_between] → MatMul(w2) → y."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"), *nodes_between,
             helper.make_node("MatMul", ["a" if nodes_between else "h", "w2"], ["y"], name="fc2")]
    return _unchecked(nodes, [_vi("x", x_shape, x_dtype)], [_vi("y", y_shape)],
                      {"w": w, "w2": _W.T.copy()}, opset, ir_version, domains)


def _relu_between():
    return [helper.make_node("Relu", ["h"], ["a"], name="relu")]


# Models that are invalid (checker, structure, opset) — each: file name → builder.
def _invalid_models() -> dict[str, tuple[Callable[[], onnx.ModelProto], str | None]]:
    cyc_nodes = [helper.make_node("MatMul", ["x2", "w"], ["h"], name="fc1"),
                 helper.make_node("Add", ["h", "y"], ["x2"], name="loop"),
                 helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    models = {
        "opset7.onnx": (lambda: _linear(_relu_between(), opset=7, ir_version=3), "opset 7"),
        "opset11.onnx": (lambda: _linear(_relu_between(), opset=11, ir_version=6), "opset 11"),
        "opset12.onnx": (lambda: _linear(_relu_between(), opset=12, ir_version=7), "opset 12"),
        "opset99.onnx": (lambda: _linear(_relu_between(), opset=99), "opset 99"),
        "opset30.onnx": (lambda: _linear(_relu_between(), opset=30), "opset 30"),
        "irversion99.onnx": (lambda: _linear(_relu_between(), ir_version=99), None),
        "irversion0.onnx": (lambda: _linear(_relu_between(), ir_version=0), None),
        "cycle.onnx": (lambda: _unchecked(cyc_nodes, [_vi("x", ["B", 32])], [_vi("y", ["B", 32])],
                                          {"w": _W, "w2": _W}), None),
        "self_loop.onnx": (lambda: _unchecked(
            [helper.make_node("MatMul", ["h", "w"], ["h"], name="fc")],
            [_vi("x", ["B", 32])], [_vi("h", ["B", 32])], {"w": _W}), None),
        "dangling_input.onnx": (lambda: _linear(
            [helper.make_node("Add", ["h", "nowhere"], ["a"], name="add")]), None),
        "dangling_output.onnx": (lambda: _unchecked(
            [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc")],
            [_vi("x", ["B", 32])], [_vi("not_produced", ["B", 32])], {"w": _W}), None),
        "no_input_shape.onnx": (lambda: _linear(_relu_between(), x_shape=None), "shape"),
        "duplicate_output.onnx": (lambda: _unchecked(
            [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"),
             helper.make_node("Relu", ["x"], ["h"], name="relu")],
            [_vi("x", ["B", 32])], [_vi("h", ["B", 32])], {"w": _W}), None),
        "unknown_standard_op.onnx": (lambda: _linear(
            [helper.make_node("FrobnicateNotAnOp", ["h"], ["a"], name="weird")]), None),
        "bad_attribute.onnx": (lambda: _linear(
            [helper.make_node("Softmax", ["h"], ["a"], name="sm", axis="oops")]), None),
        "no_graph_outputs.onnx": (lambda: _unchecked(
            [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc")],
            [_vi("x", ["B", 32])], [], {"w": _W}), None),
        "empty_graph.onnx": (lambda: _unchecked([], [], [], {}), None),
        "missing_opset.onnx": (lambda: _no_default_opset(), None),
        "wrong_arity.onnx": (lambda: _linear(
            [helper.make_node("Relu", ["h", "h"], ["a"], name="relu2")]), None),
        "raw_data_short.onnx": (lambda: _short_raw_data(), None),
        "missing_external.onnx": (lambda: _missing_external(), None),
    }
    return models


def _no_default_opset() -> onnx.ModelProto:
    m = _linear(_relu_between())
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def _short_raw_data() -> onnx.ModelProto:
    m = _linear(_relu_between())
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:100]
    return m


def _missing_external() -> onnx.ModelProto:
    m = _linear(_relu_between())
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "gone.bin", "offset": "0", "length": str(32 * 32 * 4)}.items():
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return m


# Valid but unusual models: compile what can be compiled (exit 0).
def _unusual_models() -> dict[str, Callable[[], onnx.ModelProto]]:
    return {
        "custom_op.onnx": lambda: _linear(
            [helper.make_node("Swish", ["h"], ["a"], name="custom", domain="com.example")],
            domains=("com.example",)),
        "unknown_dims.onnx": lambda: _linear(_relu_between(), x_shape=(None, None, 32), y_shape=(None, None, None)),
        "unsorted.onnx": lambda: _unchecked(  # invalid ONNX, but only the order: sorted on load
            [helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
             helper.make_node("Relu", ["g"], ["h"], name="relu"),
             helper.make_node("MatMul", ["x", "w"], ["g"], name="fc1")],
            [_vi("x", ["B", 32])], [_vi("y", ["B", 32])], {"w": _W, "w2": _W}),
        "all_dynamic.onnx": lambda: _linear(_relu_between(), x_shape=("a", "b", "c"), y_shape=("a", "b", "d")),
        "rank2.onnx": lambda: _linear(_relu_between(), x_shape=(4, 32), y_shape=(4, 32)),
        "no_quantizable_op.onnx": lambda: _unchecked(
            [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "x"], ["y"], name="add")],
            [_vi("x", ["B", 32])], [_vi("y", ["B", 32])], {}),
        "activation_matmul_only.onnx": lambda: graphs.attention_scores(),
        "constant_only.onnx": lambda: _unchecked(
            [helper.make_node("Identity", ["c"], ["y"], name="id")], [], [_vi("y", [32, 32])], {"c": _W}),
        "mlp_old_opset13.onnx": lambda: _linear(_relu_between(), opset=13, ir_version=7),
    }


# --- corruptions of a valid model -----------------------------------------------------------


def _mlp_bytes() -> bytes:
    return graphs.mlp().SerializeToString()


def _truncated(fraction: float) -> bytes:
    data = _mlp_bytes()
    return data[: max(1, int(len(data) * fraction))]


def _bit_flipped(seed: int, region: str) -> bytes:
    """One to three bits flipped; ``region`` 'head': in the first 300 bytes (graph structure,
    names), 'any': anywhere."""
    data = bytearray(_mlp_bytes())
    rng = np.random.default_rng(seed)
    hi = 300 if region == "head" else len(data)
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(0, hi))
        data[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(data)


def _zip_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.onnx", _mlp_bytes())
    return buf.getvalue()


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


NOT_ONNX = {
    "text.onnx": b"this is not a model\n",
    "json.onnx": json.dumps({"graph": {"node": []}}).encode(),
    "png.onnx": b"\x89PNG\r\n\x1a\n" + bytes(200),
    "zeros.onnx": bytes(4096),
    "ones.onnx": b"\xff" * 4096,
    "random.onnx": np.random.default_rng(7).bytes(5000),
    "zip.onnx": None,  # filled lazily (needs the mlp)
    "npz.onnx": None,
    "one_byte.onnx": b"\x08",
    "newline.onnx": b"\n",
    "pickle.onnx": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
    "utf16.onnx": "ir_version: 8".encode("utf-16"),
}


# --- calibration data -----------------------------------------------------------------------


def _x(n=4, shape=(1, 3, 32), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(dtype)


def _calib_npz_cases() -> dict[str, tuple[Callable[[], bytes], str | None]]:
    x = _x()
    nan = x.copy()
    nan[1, 0, 0, 3] = np.nan
    inf = x.copy()
    inf[2, 0, 1, 1] = np.inf
    ninf = x.copy()
    ninf[0, 0, 0, 0] = -np.inf
    return {
        "missing_input.npz": (lambda: _npz_bytes(other=x), "inputs do not match"),
        "extra_input.npz": (lambda: _npz_bytes(x=x, extra=x), "inputs do not match"),
        "misnamed_input.npz": (lambda: _npz_bytes(X=x), "inputs do not match"),
        "no_arrays.npz": (lambda: _npz_bytes(), None),
        "int_for_float.npz": (lambda: _npz_bytes(x=(x * 10).astype(np.int64)), "OK"),  # cast (same kind)
        "bool_for_float.npz": (lambda: _npz_bytes(x=x > 0), "OK"),
        "wrong_dtype_str.npz": (lambda: _npz_bytes(x=np.array([["a", "b"]] * 4)), None),
        "wrong_dtype_complex.npz": (lambda: _npz_bytes(x=x.astype(np.complex64)), None),
        "float64.npz": (lambda: _npz_bytes(x=x.astype(np.float64)), "OK"),
        "rank_too_low.npz": (lambda: _npz_bytes(x=_x(shape=(32,))), "rank"),
        "rank_too_high.npz": (lambda: _npz_bytes(x=_x(shape=(1, 1, 3, 32))), "rank"),
        "scalar.npz": (lambda: _npz_bytes(x=np.float32(1.0)), None),
        "wrong_last_dim.npz": (lambda: _npz_bytes(x=_x(shape=(1, 3, 16))), None),
        "nan.npz": (lambda: _npz_bytes(x=nan), "NaN"),
        "inf.npz": (lambda: _npz_bytes(x=inf), "NaN or Inf"),
        "neg_inf.npz": (lambda: _npz_bytes(x=ninf), "NaN or Inf"),
        "all_nan.npz": (lambda: _npz_bytes(x=np.full((2, 1, 3, 32), np.nan, np.float32)), "NaN"),
        "zero_samples.npz": (lambda: _npz_bytes(x=np.zeros((0, 1, 3, 32), np.float32)), None),
        "empty_sample.npz": (lambda: _npz_bytes(x=np.zeros((3, 1, 0, 32), np.float32)), None),
        "huge_values.npz": (lambda: _npz_bytes(x=np.full((2, 1, 3, 32), 3e38, np.float32)), "not finite"),
        "all_zero.npz": (lambda: _npz_bytes(x=np.zeros((2, 1, 3, 32), np.float32)), "OK"),
        "object_array.npz": (lambda: _object_npz(), None),
        "truncated.npz": (lambda: _npz_bytes(x=x)[:300], None),
        "not_zip.npz": (lambda: b"not an npz at all", None),
        "empty.npz": (lambda: b"", None),
        "npy_not_npz.npz": (lambda: _npy_bytes(x), "OK?"),
    }


def _object_npz() -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.array([np.zeros(3), None], dtype=object))
    return buf.getvalue()


def _npy_bytes(x) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _calib_folders() -> dict[str, tuple[Callable[[Path], None], str | None]]:
    def good(i):
        return {"x": _x(1, seed=i)[0]}

    def write(files: dict[str, dict | bytes]):
        def make(folder: Path):
            folder.mkdir(parents=True, exist_ok=True)
            for name, content in files.items():
                (folder / name).write_bytes(content if isinstance(content, bytes) else _npz_bytes(**content))
        return make

    nan = good(2)
    nan["x"][0, 0] = np.nan
    return {
        "empty_folder": (write({}), "no .npz files"),
        "folder_without_npz": (write({"a.txt": b"hello", "b.npy": _npy_bytes(_x(1))}), "no .npz files"),
        "folder_bad_third": (write({"0.npz": good(0), "1.npz": good(1), "2.npz": b"junk"}), "cannot read"),
        "folder_nan_third": (write({"0.npz": good(0), "1.npz": good(1), "2.npz": nan}), "NaN"),
        "folder_misnamed_second": (write({"0.npz": good(0), "1.npz": {"y": _x(1)[0]}}), "inputs do not match"),
        "folder_rank_second": (write({"0.npz": good(0), "1.npz": {"x": _x(1)}}), "rank"),
        "folder_stacked_files": (write({"0.npz": {"x": _x(3)}}), "rank"),
        "folder_empty_npz": (write({"0.npz": {}}), "inputs do not match"),
        "folder_string_second": (write({"0.npz": good(0), "1.npz": {"x": np.full((1, 3, 32), "a")}}), "expects float32"),
    }


# --- tokenizer folders ----------------------------------------------------------------------


def _tokenizer_dirs() -> dict[str, Callable[[Path], None]]:
    def files(content: dict[str, bytes]):
        def make(folder: Path):
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in content.items():
                (folder / name).write_bytes(data)
        return make

    return {
        "tok_empty": files({}),
        "tok_garbage_json": files({"tokenizer.json": b"{not json", "tokenizer_config.json": b"{}"}),
        "tok_wrong_json": files({"tokenizer.json": b'{"model": 3}', "tokenizer_config.json": b"{}"}),
        "tok_config_only": files({"config.json": b'{"model_type": "bert"}'}),
        "tok_binary": files({"tokenizer.json": bytes(range(256)), "vocab.txt": b"\xff\xfe"}),
    }


# --- the cases ------------------------------------------------------------------------------


def _mlp(root: Path) -> Path:
    return _once(root, "mlp.onnx", lambda p: onnx.save(graphs.mlp(), p))


def _calib(root: Path) -> Path:
    return _once(root, "good_calib.npz", lambda p: p.write_bytes(_npz_bytes(x=_x())))


def _out(root: Path, case_id: str) -> Path:
    folder = root / "out"
    folder.mkdir(exist_ok=True)
    return folder / f"{case_id.replace('/', '_')}.onnx"


COMMANDS = {
    # name → argv after MODEL (OUT is filled in per case)
    "dyn": ["--w8a8", "--quiet"],
    "static": ["--w8a8", "--calib-data", "{calib}", "--quiet"],
    "rtn": ["--w4a16", "--method", "rtn", "--quiet"],
}


def _compile_argv(root: Path, model: Path, command: str, case_id: str, extra=()) -> list[str]:
    args = [a.format(calib=_calib(root)) for a in COMMANDS[command]]
    return [str(model), *args, "-o", str(_out(root, case_id)), *extra]


def _model_cases(name: str, file: Callable[[Path], Path], expect: str, fragment=None,
                 commands=("dyn", "static", "rtn", "plan", "eval")) -> list[Case]:
    out = []
    for command in commands:
        cid = f"{name}/{command}"
        if command == "plan":
            build = lambda root, f=file: ["plan", str(f(root)), "--w8a8"]
        elif command == "eval":
            build = lambda root, f=file: ["eval", str(_mlp(root)), str(f(root)), "--task", "image",
                                          "--data", str(_calib(root)), "--runs", "1"]
        else:
            build = lambda root, f=file, c=command, i=cid: _compile_argv(root, f(root), c, i)
        out.append(Case(cid, expect, build, fragment))
    return out


def cases() -> list[Case]:
    all_cases: list[Case] = []
    # 1. Files that are not ONNX models at all.
    for name, data in NOT_ONNX.items():
        if name == "zip.onnx":
            file = lambda root: _once(root, "zip.onnx", lambda p: p.write_bytes(_zip_bytes()))
        elif name == "npz.onnx":
            file = lambda root: _once(root, "npz.onnx", lambda p: p.write_bytes(_npz_bytes(x=_x())))
        else:
            file = _bytes_file(name, data)
        all_cases += _model_cases(f"not_onnx_{name}", file, ERROR)
    all_cases += _model_cases("empty_file", _bytes_file("empty.onnx", b""), ERROR, "empty")
    all_cases += _model_cases("missing_file", lambda root: root / "does_not_exist.onnx", ERROR, "not found")
    all_cases += _model_cases("folder_as_model", lambda root: _once(root, "dir.onnx", lambda p: p.mkdir()),
                              ERROR)
    # 2. Truncated and bit-flipped protobufs.
    for fraction in (0.02, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99):
        all_cases += _model_cases(f"truncated_{fraction}", _bytes_file(f"trunc_{fraction}.onnx", _truncated(fraction)),
                                  EITHER, commands=("dyn", "static", "plan"))
    for seed in range(12):
        region = "head" if seed % 2 == 0 else "any"
        all_cases += _model_cases(f"bitflip_{region}_{seed}",
                                  _bytes_file(f"flip_{seed}.onnx", _bit_flipped(seed, region)),
                                  EITHER, commands=("dyn", "static", "rtn") if seed < 6 else ("dyn",))
    # 3. Models that fail the checker, structure or opset rules.
    for name, (make, fragment) in _invalid_models().items():
        commands = ("dyn", "static", "rtn", "plan") if name.startswith(("opset", "cycle", "dangling")) else ("dyn", "plan")
        all_cases += _model_cases(f"invalid_{name}", _proto_file(name, make), ERROR, fragment, commands)
    # 4. Valid but unusual models: compile what can be compiled.
    for name, make in _unusual_models().items():
        all_cases += _model_cases(f"unusual_{name}", _proto_file(name, make), OK, commands=("dyn", "rtn", "plan"))
    # 5. Calibration data (static W8A8 on the mlp).
    for name, (make, fragment) in _calib_npz_cases().items():
        file = lambda root, n=name, m=make: _once(root, f"calib/{n}", lambda p: p.write_bytes(m()))  # noqa: E731
        expect = OK if fragment == "OK" else (EITHER if fragment == "OK?" else ERROR)
        frag = None if fragment in ("OK", "OK?") else fragment
        all_cases.append(Case(
            f"calib_{name}", expect,
            lambda root, f=file, n=name: [str(_mlp(root)), "--w8a8", "--calib-data", str(f(root)),
                                          "-o", str(_out(root, "calib_" + n)), "--quiet"], frag))
        all_cases.append(Case(  # eval runs what it is given: overflowing outputs are its result
            f"calib_{name}/eval", EITHER if fragment == "not finite" else expect,
            lambda root, f=file: ["eval", str(_mlp(root)), str(_mlp(root)), "--task", "image",
                                  "--data", str(f(root)), "--runs", "1"], frag))
    for name, (make, fragment) in _calib_folders().items():
        folder = lambda root, n=name, m=make: _once(root, f"calib_dirs/{n}", m)
        all_cases.append(Case(
            f"calibdir_{name}", ERROR,
            lambda root, f=folder, n=name: [str(_mlp(root)), "--w8a8", "--calib-data", str(f(root)),
                                            "-o", str(_out(root, "calibdir_" + n)), "--quiet"], fragment))
    all_cases.append(Case("calib_missing", ERROR, lambda root: [
        str(_mlp(root)), "--w8a8", "--calib-data", str(root / "nope.npz"), "--quiet"], "not found"))
    all_cases.append(Case("calib_gptq_misnamed", ERROR, lambda root: [
        str(_mlp(root)), "--w4a16", "--no-keep-grid", "--calib-data",
        str(_once(root, "calib/misnamed_input.npz", lambda p: p.write_bytes(_npz_bytes(X=_x())))),
        "-o", str(_out(root, "gptq")), "--quiet"], "inputs do not match"))
    # 6. Tokenizer folders and calibration text.
    text = lambda root: _once(root, "calib.txt", lambda p: p.write_text("hello world\nsecond line\n"))
    for name, make in _tokenizer_dirs().items():
        folder = lambda root, n=name, m=make: _once(root, f"tok/{n}", m)
        all_cases.append(Case(f"tokenizer_{name}", ERROR, lambda root, f=folder: [
            str(_mlp(root)), "--w8a8", "--calib-text", str(text(root)), "--tokenizer", str(f(root)), "--quiet"]))
    all_cases += [
        Case("tokenizer_is_file", ERROR, lambda root: [
            str(_mlp(root)), "--w8a8", "--calib-text", str(text(root)), "--tokenizer", str(text(root)), "--quiet"]),
        Case("tokenizer_missing", ERROR, lambda root: [
            str(_mlp(root)), "--w8a8", "--calib-text", str(text(root)), "--tokenizer", str(root / "nope"),
            "--quiet"], "not found"),
        Case("calib_text_missing", ERROR, lambda root: [
            str(_mlp(root)), "--w8a8", "--calib-text", str(root / "nope.txt"), "--tokenizer", str(root),
            "--quiet"], "not found"),
        Case("eval_tokenizer_not_one", ERROR, lambda root: [
            "eval", str(_mlp(root)), str(_mlp(root)), "--task", "embedding",
            "--tokenizer", str(_once(root, "tok/tok_empty", lambda p: p.mkdir(parents=True)))]),
    ]
    # 7. Output paths.
    all_cases += [
        Case("out_is_input", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "-o", str(_mlp(root))], "input model"),
        Case("out_is_input_via_symlink", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "-o", str(
            _once(root, "link.onnx", lambda p: p.symlink_to(_mlp(root))))], "input model"),
        Case("out_is_input_relative", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "-o",
                                                           str(root / "out" / ".." / "mlp.onnx")], "input model"),
        Case("out_folder_missing", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "-o",
                                                        str(root / "no" / "such" / "o.onnx")], "does not exist"),
        Case("out_parent_is_file", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "-o",
                                                        str(_mlp(root) / "o.onnx")]),
        Case("out_unwritable", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "-o", "/proc/qcompile-out.onnx"],
             "cannot write"),
        Case("out_unwritable_static", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "--calib-data",
                                                           str(_calib(root)), "-o", "/proc/qcompile-out.onnx"],
             "cannot write"),
        Case("out_is_folder", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "-o",
                                                   str(_once(root, "outdir.onnx", lambda p: p.mkdir()))], "folder"),
        Case("out_wrong_suffix", ERROR, lambda root: [str(_mlp(root)), "--w8a8", "-o", str(root / "o.txt")], ".onnx"),
        Case("out_default_unwritable", ERROR, lambda root: ["/proc/cpuinfo.onnx", "--w8a8"]),
        Case("out_rtn_missing_folder", ERROR, lambda root: [str(_mlp(root)), "--w4a16", "--method", "rtn", "-o",
                                                            str(root / "nope" / "o.onnx")], "does not exist"),
        Case("eval_json_missing_folder", ERROR, lambda root: [
            "eval", str(_mlp(root)), str(_mlp(root)), "--task", "image", "--data", str(_calib(root)),
            "--runs", "1", "--json", str(root / "nope" / "r.json")]),
    ]
    # 8. Contradictory or out-of-range flags.
    flags = {
        "two_recipes": ["--w8a8", "--w4a16"],
        "two_recipes_b": ["--w4a16", "--w8a16"],
        "method_with_w8a8": ["--w8a8", "--method", "rtn"],
        "bits_with_w8a8": ["--w8a8", "--bits", "4"],
        "group_with_w8a8": ["--w8a8", "--group-size", "64"],
        "act_order_with_w8a8": ["--w8a8", "--act-order"],
        "activations_with_w4a16": ["--w4a16", "--activations", "dynamic"],
        "smoothquant_with_w4a16": ["--w4a16", "--smoothquant"],
        "float_residuals_with_w4a16": ["--w4a16", "--float-residuals"],
        "smoothquant_without_data": ["--w8a8", "--smoothquant"],
        "act_order_without_data": ["--w4a16", "--act-order"],
        "gptq_without_data": ["--w4a16", "--method", "gptq"],
        "awq_without_data": ["--w4a16", "--method", "awq"],
        "static_without_data": ["--w8a8", "--activations", "static"],
        "qdq_dynamic": ["--w8a8", "--target", "qdq", "--activations", "dynamic"],
        "cuda_per_token": ["--w8a8", "--target", "ort-cuda", "--activations", "per-token"],
        "calib_data_and_text": ["--w8a8", "--calib-data", "{calib}", "--calib-text", "{calib}"],
        "tokenizer_without_text": ["--w8a8", "--tokenizer", "{root}"],
        "verify_without_data": ["--w8a8", "--verify"],
        "verify_weight_only": ["--w4a16", "--method", "rtn", "--verify"],
        "percentile_too_high": ["--w8a8", "--calib-data", "{calib}", "--percentile", "150"],
        "percentile_negative": ["--w8a8", "--calib-data", "{calib}", "--percentile", "-3"],
        "percentile_nan": ["--w8a8", "--calib-data", "{calib}", "--percentile", "nan"],
        "max_samples_zero": ["--w8a8", "--calib-data", "{calib}", "--max-calib-samples", "0"],
        "seq_len_one": ["--w8a8", "--seq-len", "1"],
        "alpha_too_big": ["--w8a8", "--calib-data", "{calib}", "--smoothquant-alpha", "2"],
        "alpha_with_no_smoothquant": ["--w8a8", "--calib-data", "{calib}", "--no-smoothquant",
                                      "--smoothquant-alpha", "0.5"],
        "bits_bad": ["--w4a16", "--bits", "5"],
        "group_negative": ["--w4a16", "--group-size", "-1"],
        "group_zero_rtn": ["--w4a16", "--method", "rtn", "--group-size", "0"],
        "lm_head_bits_bad": ["--w4a16", "--lm-head-bits", "7"],
        "target_bad": ["--w8a8", "--target", "tensorrt"],
        "calib_method_bad": ["--w8a8", "--calib-method", "magic"],
        "unknown_flag": ["--w8a8", "--fast"],
        "no_recipe": [],
        "verify_negative": ["--w8a8", "--verify", "-1"],
        "three_recipes": ["--w8a16", "--w8a8", "--w4a16"],
        "fp8_and_w8a8": ["--fp8", "--w8a8"],
        "int8_mixed_and_w4a16": ["--w4a16", "--int8-mixed"],
        "bits_not_a_number": ["--w4a16", "--bits", "four"],
        "group_not_a_number": ["--w4a16", "--group-size", "1e3"],
        "alpha_negative": ["--w8a8", "--calib-data", "{calib}", "--smoothquant-alpha", "-0.5"],
        "max_samples_text": ["--w8a8", "--calib-data", "{calib}", "--max-calib-samples", "all"],
        "awq_with_w8a8": ["--w8a8", "--method", "awq", "--calib-data", "{calib}"],
        "lm_head_with_w8a8": ["--w8a8", "--lm-head-bits", "8"],
    }
    for name, extra in flags.items():
        all_cases.append(Case(f"flags_{name}", ERROR, lambda root, e=extra, n=name: [
            str(_mlp(root)), *[a.format(calib=_calib(root), root=root) for a in e],
            "-o", str(_out(root, "flags_" + n)), "--quiet"]))
        if name in ("two_recipes", "method_with_w8a8", "static_without_data", "bits_bad", "no_recipe"):
            all_cases.append(Case(f"flags_{name}/plan", ERROR, lambda root, e=extra: [
                "plan", str(_mlp(root)), *[a.format(calib=_calib(root), root=root) for a in e]]))
    # 9. eval with mismatched or broken models.
    all_cases += [
        Case("eval_quant_missing", ERROR, lambda root: [
            "eval", str(_mlp(root)), str(root / "nope.onnx"), "--task", "embedding", "--data", str(_calib(root))],
            "not found"),
        Case("eval_float_missing", ERROR, lambda root: [
            "eval", str(root / "nope.onnx"), str(_mlp(root)), "--task", "embedding", "--data", str(_calib(root))],
            "not found"),
        Case("eval_other_model", ERROR, lambda root: [
            "eval", str(_mlp(root)), str(_proto_file("gemm.onnx", graphs.gemm)(root)), "--task", "embedding",
            "--data", str(_calib(root)), "--runs", "1"]),
        Case("eval_conv_with_mlp_data", ERROR, lambda root: [
            "eval", str(_proto_file("conv.onnx", graphs.conv)(root)), str(_proto_file("conv.onnx", graphs.conv)(root)),
            "--task", "image", "--data", str(_calib(root)), "--runs", "1"], "rank"),
        Case("eval_task_lm_on_mlp", ERROR, lambda root: [
            "eval", str(_mlp(root)), str(_mlp(root)), "--task", "lm", "--data", str(_calib(root)), "--runs", "1"]),
        Case("eval_task_embedding_on_mlp", ERROR, lambda root: [
            "eval", str(_mlp(root)), str(_mlp(root)), "--task", "embedding", "--data", str(_calib(root)),
            "--runs", "1"], "attention_mask"),
        Case("eval_runs_zero", ERROR, lambda root: [
            "eval", str(_mlp(root)), str(_mlp(root)), "--task", "embedding", "--runs", "0"]),
        Case("eval_bad_task", ERROR, lambda root: [
            "eval", str(_mlp(root)), str(_mlp(root)), "--task", "speech"]),
        Case("eval_no_args", ERROR, lambda root: ["eval"]),
        Case("plan_no_args", ERROR, lambda root: ["plan"]),
        Case("models_unknown", ERROR, lambda root: ["models", "path", "gpt5"], "unknown reference model"),
    ]
    return all_cases
