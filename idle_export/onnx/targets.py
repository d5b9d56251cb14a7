"""Where an exported file runs: the graph passes (onnx.passes) that `idle-export onnx --target`
writes into the file, and which runtime (runtime.registry: each names its target) runs which file.

| target   | passes written into the file                          | ops                      |
|----------|-------------------------------------------------------|--------------------------|
| portable | none: the plain export (default)                      | standard ONNX            |
| ort      | fold_initializer_ops, gather_rows, bias_gelu          | + com.microsoft.BiasGelu |
| openvino | fold_initializer_ops, gather_rows                     | standard ONNX            |
| tensorrt | none                                                  | standard ONNX            |

Why (docs/benchmark.md, "CPU runtimes"): on OpenVINO 2026.4 (DeiT-S r=0.7, 1 thread, CPU
time) gather_rows makes the idle graph 7-8 % faster (GatherElements over C expanded indices
→ GatherND row copies); OpenVINO folds constants and fuses GELU itself, so
fold_initializer_ops, bias_gelu and linear_to_gemm changed nothing measurable there, and
bias_gelu's com.microsoft op is left out to keep the file standard. TensorRT folds constants
and fuses the graph at build time, and `idle-export trt`'s FP16 and plugin paths read the
plain export: nothing is written for it (no GPU here to measure more). The portable file is
the one every consumer reads (TensorRT, calibrate, the plugin form, other runtimes).

The file records `idle_export.target` and `idle_export.optimized` (the passes, in order).
"""

from __future__ import annotations

from idle_export.errors import BadInputError
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.passes import DEFAULT_PASSES, optimize_model_proto

TARGET_PASSES: dict[str, tuple[str, ...]] = {
    "portable": (),
    "ort": DEFAULT_PASSES,
    "openvino": ("fold_initializer_ops", "gather_rows"),
    "tensorrt": (),
}
TARGETS = tuple(TARGET_PASSES)
DEFAULT_TARGET = "portable"

# `calibrate --target` (quantize.qdq) names TensorRT "trt", as the command that builds engines.
CALIBRATE_TARGET = {"tensorrt": "trt"}

# Passes whose ops only ONNX Runtime knows (com.microsoft domain).
ORT_ONLY_PASSES = {"bias_gelu", "fuse_transformer_ops"}


def check_target(target: str) -> str:
    if target not in TARGET_PASSES:
        raise BadInputError(f"target={target!r} is not one of {', '.join(TARGETS)}",
                            "use target=portable (default), ort, openvino or tensorrt")
    return target


def apply_target(proto, target: str):
    """The passes of `target` that the graph does not have yet, applied in order; the metadata
    gains idle_export.target and idle_export.optimized (all passes the graph now has)."""
    check_target(target)
    meta = OnnxMetadata.of(proto)
    done = file_passes(meta)
    todo = tuple(p for p in TARGET_PASSES[target] if p not in done)
    if todo:
        proto = optimize_model_proto(proto, todo)
    OnnxMetadata.of(proto).updated(target=target, optimized=[*done, *todo]).write(proto)
    return proto


def file_passes(meta: OnnxMetadata) -> list[str]:
    """The graph passes a file already has (idle_export.optimized; [] for a plain export)."""
    value = meta.get("optimized") or []
    return [str(p) for p in value] if isinstance(value, list) else []


def file_target(meta: OnnxMetadata) -> str:
    """The target a file was written for: idle_export.target, else portable for a plain export
    (or "custom" for one whose passes were applied by hand)."""
    target = meta.get("target")
    if isinstance(target, str) and target:
        return target
    return "custom" if file_passes(meta) else "portable"


def missing_passes(meta: OnnxMetadata, target: str) -> tuple[str, ...]:
    """The passes of `target` that the file lacks: what `--optimize` applies in memory."""
    done = set(file_passes(meta))
    return tuple(p for p in TARGET_PASSES[target] if p not in done)


def runs_on(meta: OnnxMetadata, target: str | None) -> bool:
    """Whether a runtime whose export target is `target` (runtime.registry) runs this file as
    written: INT8 files only on the runtime they were calibrated for; FP32 files with ONNX
    Runtime-only ops (com.microsoft) only on ONNX Runtime; standard-op files everywhere."""
    if meta.precision == "int8":
        made_for = (meta.get("quantization") or {}).get("target")
        return made_for in (target, CALIBRATE_TARGET.get(target))
    if set(file_passes(meta)) & ORT_ONLY_PASSES or file_target(meta) == "ort":
        return target == "ort"
    return True
