"""INT8 for OpenVINO (`calibrate --target openvino`): NNCF post-training quantization of the
FP32 ONNX file, with the token selection left in FP32.

1. the `openvino` export target's passes that the file lacks (onnx.targets: folded weight
   slices, so NNCF sees every weight as a constant; row gathers);
2. the selection path (quantize.selection.selection_path_nodes: scores, TopK, index
   arithmetic) becomes an `nncf.IgnoredScope`;
3. `nncf.quantize` (ONNX backend, model_type TRANSFORMER, target device CPU: NNCF's placement
   for OpenVINO's CPU plugin, SmoothQuant and fast bias correction included) over the same
   calibration images as the ORT recipe (data.images.load_images), one image per sample (NNCF
   collects per-sample statistics);
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
from idle_export.onnx.io import install_onnx
from idle_export.onnx.metadata import OnnxMetadata
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


def nncf_quantize(proto, calib_array, *, per_channel: bool = True, say=None):
    """The NNCF-quantized copy of `proto` (an FP32 idle-export graph) and the recipe metadata."""
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
            quantized = nncf.quantize(proto, dataset, subset_size=len(samples),
                                      model_type=nncf.ModelType.TRANSFORMER,
                                      target_device=nncf.TargetDevice.CPU,
                                      ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                                      advanced_parameters=advanced)
    finally:
        nncf.set_log_level(previous or logging.INFO)
    leaked = sum(dequantized_score_inputs(quantized))
    if leaked:
        raise IdleExportError(f"NNCF quantized the token scores of {leaked} idle layer(s) despite the "
                              "ignored scope", "report it with the model; use target=ort meanwhile")
    recipe = {"target": "openvino", "tool": f"nncf {nncf.__version__}", "method": "minmax",
              "num_images": len(samples), "per_channel": per_channel, "format": "QDQ",
              "model_type": "transformer", "selection_path_fp32": len(selection),
              "attention_unquantized": len(attention), "conv_unquantized": len(convs)}
    OnnxMetadata(meta.ours()).updated(precision="int8", quantization=recipe).write(quantized)
    return quantized, recipe


def write_openvino(proto, meta, src: Path, dst: Path, calib, external: bool, per_channel: bool, say,
                   t0: float) -> dict:
    """`--target openvino`: NNCF (quantize.openvino_int8) instead of ONNX Runtime's quantizer."""
    quantized, recipe = nncf_quantize(proto, calib.array, per_channel=per_channel, say=say)
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
