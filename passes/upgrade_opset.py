"""Raise a model's default-domain opset (fp8 Q/DQ needs 19: QuantizeLinear/DequantizeLinear
with float8 types)."""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.errors import QCompileError


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Raise the default-domain opset to at least ``version`` (onnxscript's version converter);
    a model already there is left alone."""

    def __init__(self, version: int = 19) -> None:
        super().__init__()
        self.version = version

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.opset_imports.get("", 0)
        if before >= self.version:
            return ir.passes.PassResult(model, modified=False)
        from onnxscript import version_converter

        version_converter.convert_version(model, target_version=self.version, fallback=True)
        if model.opset_imports.get("", 0) < self.version:
            raise QCompileError(
                f"cannot convert this opset-{before} model to opset {self.version} (fp8 Q/DQ); "
                "convert it with onnx.version_converter first")
        self.summary = f"opset {before} → {self.version}"
        return ir.passes.PassResult(model, modified=True)
