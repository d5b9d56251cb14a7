"""onnx stage."""
