"""Running models: ONNX Runtime sessions and providers."""
