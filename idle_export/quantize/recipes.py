"""The INT8 recipes of `calibrate` per target, and the checks of its options (quantize.qdq
writes the files)."""

from __future__ import annotations

from idle_export.errors import BadInputError

METHODS = ("minmax", "percentile", "entropy")
TARGETS = ("ort", "trt", "openvino")
EXPORT_TARGET = {"ort": "ort", "trt": "tensorrt", "openvino": "openvino"}  # onnx.targets name


# The recipes: quant_format (QDQ|QOperator), activation / weight type, op_types, whether
# activation×activation MatMuls (attention q·kᵀ, attn·v) are quantized, bias_gelu (idle_export.
# optimize's Erf-GELU + bias → com.microsoft.BiasGelu before quantizing; ORT only), quantize_static
# extra_options, fuse_bias (fuse_matmul_bias after quantizing).
# activations="auto": each target's choice. ort: asymmetric uint8 (the fastest u8s8 kernels);
# trt: symmetric, all TensorRT takes; openvino: symmetric (NNCF's PERFORMANCE preset; its
# transformer default is MIXED, asymmetric): 6-8 % faster on AMX and as exact on photos10
ACTIVATIONS = {"ort": "asymmetric", "trt": "symmetric", "openvino": "symmetric"}
# weight_range="auto": each target's. ort: "reduced", 7-bit weights (ONNX Runtime's reduce_range):
# ORT's u8×s8 kernels on x86 CPUs without VNNI add pairs of products in 16 bits, which saturate
# with 8-bit weights (photos10: top-1 agreement 98 %); 7-bit weights cannot, run the same kernels
# at the same speed and were as exact on photos10 (docs/int8.md#cpus-without-vnni). "full" keeps
# 8-bit weights: exact where every CPU that runs the file has VNNI or AMX (or ONNX Runtime sets
# session.x64quantprecision, as this project's sessions do). trt: 8-bit (a GPU does not
# saturate); openvino: NNCF's own overflow fix, neither value.
WEIGHT_RANGES = {"ort": "reduced", "trt": "full", "openvino": None}
RECIPES: dict[str, dict] = {
    # Measured fastest on ORT CPU (x86 AVX-512 VNNI; README, INT8): u8 activations × s8 weights,
    # weight MatMuls only, float MatMul outputs (DQ→MatMul fuses into MatMulIntegerToFloat, no
    # requantize), Erf-GELU + bias fused into BiasGelu; SkipLayerNormalization fusion off (its
    # CPU kernel was slower than Add + LayerNormalization here); the other bias Adds folded into
    # MatMulIntegerToFloat (fuse_matmul_bias).
    "ort": {
        "quant_format": "QDQ",
        "activation": "QUInt8",
        "weight": "QInt8",
        "op_types": ["MatMul", "Gemm", "Conv"],
        "activation_matmuls": False,
        "bias_gelu": True,
        "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
        "fuse_bias": True,
    },
    # TensorRT: symmetric int8 Q/DQ (zero point 0) in front of every MatMul/Gemm/Conv, float biases
    # (TensorRT rejects int32 bias DQ), standard ONNX ops only.
    "trt": {
        "quant_format": "QDQ",
        "activation": "QInt8",
        "weight": "QInt8",
        "op_types": ["MatMul", "Gemm", "Conv"],
        "activation_matmuls": True,
        "bias_gelu": False,
        "extra_options": {"QuantizeBias": False, "ActivationSymmetric": True, "WeightSymmetric": True},
        "fuse_bias": False,
    },
}


def check_weight_range(weight_range: str, target: str) -> bool:
    """Whether `target`'s INT8 weights are 7-bit (ONNX Runtime's reduce_range) for weight_range
    "auto", "reduced" or "full"; BadInputError for another value, or one the target cannot take."""
    if weight_range not in ("auto", "reduced", "full"):
        raise BadInputError(f"weight_range={weight_range!r} is not auto, reduced or full",
                            "use weight_range=auto (the target's choice), reduced (7-bit) or full (8-bit)")
    if target == "trt" and weight_range == "reduced":
        raise BadInputError("TensorRT's INT8 on a GPU does not saturate: 7-bit weights would only lose "
                            "precision", "drop weight_range= (or use target=ort)")
    if target == "openvino" and weight_range != "auto":
        raise BadInputError("target=openvino quantizes weights with NNCF's own overflow fix, not "
                            f"weight_range={weight_range}", "drop weight_range= (or use target=ort)")
    return (weight_range if weight_range != "auto" else WEIGHT_RANGES[target]) == "reduced"


def check_recipe(method: str, target: str, activations: str, weight_range: str) -> tuple[bool, bool]:
    """(symmetric activations, 7-bit weights) for these options of `quantize_onnx`; BadInputError
    naming the fix for a value that is not one, or one the target cannot take."""
    if method not in METHODS:
        raise BadInputError(f"method={method!r} is not one of {', '.join(METHODS)}",
                            "use method=minmax (default), percentile or entropy")
    if target not in TARGETS:
        raise BadInputError(f"target={target!r} is not one of {', '.join(TARGETS)}",
                            "use target=ort (ONNX Runtime CPU), trt (TensorRT) or openvino (NNCF)")
    if activations not in ("auto", "symmetric", "asymmetric"):
        raise BadInputError(f"activations={activations!r} is not auto, symmetric or asymmetric",
                            "use activations=auto (the target's choice), symmetric or asymmetric")
    if target == "trt" and activations == "asymmetric":
        raise BadInputError("TensorRT's INT8 takes symmetric activations only (zero point 0)",
                            "drop activations= (or use target=ort or openvino)")
    if target == "openvino" and method != "minmax":
        raise BadInputError(f"target=openvino calibrates with NNCF's own min/max ranges, not method="
                            f"{method}", "drop method= (or use target=ort)")
    symmetric = (activations if activations != "auto" else ACTIVATIONS[target]) == "symmetric"
    return symmetric, check_weight_range(weight_range, target)
