"""trt stage."""
