"""idle-export: deploy IdleViT models (ONNX, TensorRT, parity checks, benchmarks, serving)."""

__version__ = "0.1.0"
