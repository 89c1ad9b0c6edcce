"""qcompile: an ONNX graph-rewriting quantization compiler."""

__version__ = "0.1.0"
