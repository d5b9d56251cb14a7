"""INT8 for OpenVINO (`calibrate --target openvino`): NNCF post-training quantization of the
FP32 ONNX file, with the token selection left in FP32.

1. the `openvino` export target's passes that the file lacks (onnx.targets: folded weight
   slices, so NNCF sees every weight as a constant; row gathers);
2. the selection path (quantize.selection.selection_path_nodes: scores, TopK, index
   arithmetic) becomes an `nncf.IgnoredScope`;
3. `nncf.quantize` (ONNX backend, model_type TRANSFORMER, target device CPU: NNCF's placement
   for OpenVINO's CPU plugin, SmoothQuant and fast bias correction included) over the same
   calibration images as the ORT recipe (data.images.load_images), one image per sample (NNCF
   collects per-sample statistics), with the attention MatMuls and the patch-embedding conv
   left floating point (both ran faster so in OpenVINO); SmoothQuant's scalings after a
   LayerNorm are then folded into it (fold_scales_into_layernorm);
4. the result is checked (no DequantizeLinear feeds a score MatMul) and written with the
   idle_export.* metadata, precision int8 and the recipe.

The file is Q/DQ ONNX: OpenVINO turns each Q/DQ pair into FakeQuantize and runs the MatMuls in
INT8; ONNX Runtime can run it too, but bench times it on the openvino backend (onnx.targets.
runs_on). tests/quantize/test_openvino_int8.py checks the compiled model's runtime precision.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

from idle_export.deps import pip_extra
from idle_export.errors import IdleExportError, MissingDependencyError
from idle_export.fileio import mapped_disk_full, output_folder, work_dir
from idle_export.onnx.graph import consumers as consumers_of
from idle_export.onnx.graph import producers as producers_of
from idle_export.onnx.io import install_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.passes import drop_unused_initializers
from idle_export.onnx.targets import apply_target
from idle_export.quantize.selection import activation_matmuls, dequantized_score_inputs, selection_path_nodes

NNCF_PIP = pip_extra("openvino")


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch.utils.cpp_extension's "No CUDA runtime is found, using CUDA_HOME=…", which it
    logs when imported on a machine with a CUDA toolkit and no usable GPU (NNCF imports it while
    telling what kind of model it quantizes): not news for a CPU calibration. Its other records
    pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_no_cuda_runtime_note() -> None:
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())


def import_nncf():
    """nncf, or exit 3 naming the extra that brings it."""
    quiet_no_cuda_runtime_note()
    try:
        import nncf
    except ImportError:
        raise MissingDependencyError("target=openvino calibrates with NNCF (and OpenVINO), which "
                                     "is not installed", NNCF_PIP) from None
    return nncf


def nncf_quantize(proto, calib_array, *, per_channel: bool = True, symmetric: bool = True, say=None):
    """The NNCF-quantized copy of `proto` (an FP32 idle-export graph) and the recipe metadata.
    symmetric: activations without zero points (NNCF's PERFORMANCE preset), else asymmetric
    (MIXED, NNCF's default for transformers)."""
    nncf = import_nncf()
    proto = apply_target(proto, "openvino")  # passes it lacks; metadata target = openvino
    meta = OnnxMetadata.of(proto)
    selection = selection_path_nodes(proto)
    # attention (q·kᵀ, attn·v) unquantized: their FakeQuantize ran in f32 behind layout reorders
    # and cost more than INT8 saved (docs/benchmark.md, "AMX (bf16 and INT8 tiles)")
    attention = activation_matmuls(proto)
    # the patch embedding's convolution(s): OpenVINO ran the Q/DQ convolution in f32 (0.7 ms per
    # image against 0.25 in bf16 unquantized, DeiT-S); left floating point it runs at bf16
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    ignored = selection + attention + convs
    samples = [calib_array[i:i + 1] for i in range(len(calib_array))]
    dataset = nncf.Dataset(samples, lambda x: {proto.graph.input[0].name: x})
    advanced = None
    if not per_channel:
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            QuantizationParameters,
        )

        advanced = AdvancedQuantizationParameters(
            weights_quantization_params=QuantizationParameters(per_channel=False))
    if say:
        say(f"quantizing with NNCF {nncf.__version__} ({len(selection)} selection-path nodes, "
            f"{len(attention)} attention MatMuls and {len(convs)} patch-embedding convolution(s) kept "
            "floating point)")
    previous = logging.getLogger("nncf").level
    nncf.set_log_level(logging.ERROR)
    try:  # NNCF draws progress bars on stdout: keep stdout for the CLI's JSON
        with contextlib.redirect_stdout(io.StringIO()):
            # symmetric activations (PERFORMANCE; TRANSFORMER's default is MIXED, asymmetric):
            # 6-8 % faster on AMX and at least as exact on photos10 (docs/int8.md)
            preset = nncf.QuantizationPreset.PERFORMANCE if symmetric else nncf.QuantizationPreset.MIXED
            quantized = nncf.quantize(proto, dataset, subset_size=len(samples), preset=preset,
                                      model_type=nncf.ModelType.TRANSFORMER,
                                      target_device=nncf.TargetDevice.CPU,
                                      ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                                      advanced_parameters=advanced)
    finally:
        nncf.set_log_level(previous or logging.INFO)
    folded = fold_scales_into_layernorm(quantized)
    leaked = sum(dequantized_score_inputs(quantized))
    if leaked:
        raise IdleExportError(f"NNCF quantized the token scores of {leaked} idle layer(s) despite the "
                              "ignored scope", "report it with the model; use target=ort meanwhile")
    recipe = {"target": "openvino", "tool": f"nncf {nncf.__version__}", "method": "minmax",
              "num_images": len(samples), "per_channel": per_channel, "format": "QDQ",
              "model_type": "transformer", "preset": preset.value,
              "activations": "symmetric" if symmetric else "asymmetric",
              "selection_path_fp32": len(selection),
              "attention_unquantized": len(attention), "conv_unquantized": len(convs),
              "smoothquant_scales_in_layernorm": folded}
    OnnxMetadata(meta.ours()).updated(precision="int8", quantization=recipe).write(quantized)
    return quantized, recipe


def fold_scales_into_layernorm(proto) -> int:
    """SmoothQuant's per-channel scaling after a LayerNorm (Mul(LN(x; γ, β), s) → Q/DQ → MatMul)
    goes into the LayerNorm: LN(x; γ·s, β·s), as the SmoothQuant paper does offline. OpenVINO ran
    those Muls as separate ops (DeiT-S INT8 dense: -3 % time). Only where the LayerNorm feeds the
    Mul alone: an idle layer's LN1 also feeds the token scores, which must not change. In place;
    returns the number folded."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    made_by, used_by = producers_of(proto), consumers_of(proto)
    outputs = {o.name for o in graph.output}
    folded = []
    for mul in (n for n in graph.node if n.op_type == "Mul"):
        scale = next((i for i in mul.input if i in inits), None)
        norm = next((made_by.get(i) for i in mul.input if i != scale), None)
        if scale is None or norm is None or norm.op_type != "LayerNormalization" or len(norm.input) < 3:
            continue
        if len(used_by.get(norm.output[0], [])) != 1 or norm.output[0] in outputs:
            continue
        if not all(i in inits for i in norm.input[1:3]):
            continue
        s = numpy_helper.to_array(inits[scale]).astype(np.float32)
        gamma, beta = (numpy_helper.to_array(inits[i]) for i in norm.input[1:3])
        if s.size != gamma.size or s.shape[-1] != s.size:  # one scale per channel of the last axis
            continue
        names = (norm.output[0] + "_smoothquant_gamma", norm.output[0] + "_smoothquant_beta")
        for name, value in zip(names, (gamma, beta), strict=True):
            scaled = (value * s.reshape(-1)).astype(value.dtype)
            graph.initializer.append(numpy_helper.from_array(scaled, name))
        norm.input[1], norm.input[2] = names
        norm.output[0] = mul.output[0]
        folded.append(mul)
    for mul in folded:
        graph.node.remove(mul)
    if folded:
        drop_unused_initializers(proto)  # the scales and the LayerNorms' old γ, β
    return len(folded)


def write_openvino(proto, meta, src: Path, dst: Path, calib, external: bool, per_channel: bool,
                   symmetric: bool, say, t0: float) -> dict:
    """`--target openvino`: NNCF (quantize.openvino_int8) instead of ONNX Runtime's quantizer."""
    quantized, recipe = nncf_quantize(proto, calib.array, per_channel=per_channel, symmetric=symmetric,
                                      say=say)
    recipe["calibration"] = calib.source
    OnnxMetadata.of(quantized).updated(quantization=recipe, source_model=src.name).write(quantized)
    say("writing")
    with work_dir(output_folder(dst), "int8") as tmpdir, mapped_disk_full(dst):
        install_onnx(quantized, tmpdir, dst, external_data=external)
    ops: dict[str, int] = {}
    for n in quantized.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    dq_scores = dequantized_score_inputs(quantized)
    return {"source": str(src), "output": str(dst), "external_data": external, "model": meta.spec.describe(),
            **recipe, "images": calib.summary(), "topk": ops.get("TopK", 0),
            "score_matmuls_fp32": sum(1 for d in dq_scores if not d), "ops": dict(sorted(ops.items())),
            "size_bytes": dst.stat().st_size + (dst.with_name(dst.name + ".data").stat().st_size
                                                if external else 0),
            "seconds": round(time.perf_counter() - t0, 2)}
