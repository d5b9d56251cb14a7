"""Triton's model configuration: the config.pbtxt we write (rendered, then parsed back with Triton's
own protobuf and compared field by field), names, platforms and data types."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from idle_export.deps import pip_extra
from idle_export.errors import BadInputError, IdleExportError, MissingDependencyError
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.targets import CALIBRATE_TARGET, file_target, runs_on
from idle_export.runtime import registry

CONFIG_NAME = "config.pbtxt"


LABELS_NAME = "labels.txt"


SIDECAR_NAME = "idle_export.json"


ONNX_PLATFORM = "onnxruntime_onnx"


PLAN_PLATFORM = "tensorrt_plan"


DEFAULT_FILENAMES = {ONNX_PLATFORM: "model.onnx", PLAN_PLATFORM: "model.plan"}


PLAN_SUFFIXES = (".engine", ".plan")


KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# Triton ONNX Runtime backend execution accelerators: those of runtime.registry's records
ACCELERATORS = tuple(r.triton_accelerator for r in registry.RUNTIMES.values() if r.triton_accelerator)


NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")  # no leading dot: not ".", "..", hidden


SERVE_PIP = pip_extra("serve")


# ONNX TensorProto element type -> Triton data type, numpy dtype
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 2: "TYPE_UINT8",
                   3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}


TRITON_TO_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64,
                   "TYPE_UINT8": np.uint8, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16,
                   "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_}


# ============================================================================ repository writer
@dataclass
class TensorConfig:
    name: str
    data_type: str  # Triton TYPE_*
    dims: list[int]  # without the batch dimension (with it, -1, when max_batch_size is 0)
    label_filename: str | None = None
    optional: bool = False  # a request may leave it out (an elastic file's keep_rate)
    reshape: list[int] | None = None  # what the model sees ([] : a scalar)


@dataclass
class RepoConfig:
    """What goes into config.pbtxt (the subset of Triton's ModelConfig we write)."""

    name: str
    platform: str
    max_batch_size: int
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"
    num_versions: int = 1
    parameters: dict[str, str] = field(default_factory=dict)
    comment: str = ""
    accelerator: str | None = None  # onnxruntime_onnx: "tensorrt" (GPU) or "openvino" (CPU)
    accelerator_parameters: dict[str, str] = field(default_factory=dict)


def _pb_string(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 bytes outside printable ASCII as octal)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def render_config(cfg: RepoConfig) -> str:
    """config.pbtxt text in the layout of Triton's documentation."""
    lines = [f"# {line}" for line in cfg.comment.splitlines()]
    lines += [f"name: {_pb_string(cfg.name)}", f"platform: {_pb_string(cfg.platform)}",
              f"max_batch_size: {cfg.max_batch_size}",
              f"version_policy: {{ latest: {{ num_versions: {cfg.num_versions} }} }}"]

    def tensors(kind: str, items: list[TensorConfig]) -> None:
        lines.append(f"{kind} [")
        for i, t in enumerate(items):
            lines.extend(["  {", f"    name: {_pb_string(t.name)}", f"    data_type: {t.data_type}",
                          f"    dims: [ {', '.join(str(d) for d in t.dims)} ]"])
            if t.label_filename:
                lines.append(f"    label_filename: {_pb_string(t.label_filename)}")
            if t.reshape is not None:
                lines.append(f"    reshape: {{ shape: [ {', '.join(str(d) for d in t.reshape)} ] }}")
            if t.optional:
                lines.append("    optional: true")
            lines.append("  }," if i + 1 < len(items) else "  }")
        lines.append("]")

    tensors("input", cfg.inputs)
    tensors("output", cfg.outputs)
    if cfg.max_batch_size > 0:  # (an elastic model is served unbatched: serve.elastic)
        lines += ["dynamic_batching {",
                  f"  preferred_batch_size: [ {', '.join(str(b) for b in cfg.preferred_batch_sizes)} ]",
                  f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}", "}"]
    lines += [f"instance_group [ {{ count: {cfg.instance_count}, kind: {cfg.instance_kind} }} ]"]
    if cfg.accelerator:
        where = "gpu" if cfg.accelerator == "tensorrt" else "cpu"
        params = "".join(f" parameters {{ key: {_pb_string(k)} value: {_pb_string(v)} }}"
                         for k, v in cfg.accelerator_parameters.items())
        lines += ["optimization { execution_accelerators {",
                  f"  {where}_execution_accelerator: [ {{ name: {_pb_string(cfg.accelerator)}{params} }} ]",
                  "} }"]
    for key, value in cfg.parameters.items():
        lines.append(f"parameters {{ key: {_pb_string(key)} "
                     f"value: {{ string_value: {_pb_string(value)} }} }}")
    return "\n".join(lines) + "\n"


def plain_parameters(meta: OnnxMetadata) -> dict[str, str]:
    """The idle_export.* metadata as config parameters a person can read: strings as they are
    (arch: deit_small), numbers, lists and booleans as compact JSON (keep_k: [137,137,…])."""
    out = {}
    for key, text in meta.ours().items():
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return out


def metadata_from_parameters(params: dict[str, str]) -> OnnxMetadata:
    """The inverse of plain_parameters (a served model's parameters → its metadata)."""
    props = {}
    for key, text in params.items():
        try:
            json.loads(text)
            props[key] = text
        except ValueError:
            props[key] = json.dumps(text)
    return OnnxMetadata(props)


def model_config_pb2():
    """Triton's ModelConfig protobuf module (shipped by tritonclient[grpc|http]), or None."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except Exception:  # noqa: BLE001 - tritonclient absent or its grpc part incomplete
        return None
    return pb2


def parse_config(text: str, source: str = CONFIG_NAME):
    """Parse config.pbtxt text with Triton's protobuf; a one-line error when it is not valid."""
    pb2 = model_config_pb2()
    if pb2 is None:
        raise MissingDependencyError("cannot parse config.pbtxt: tritonclient is not installed", SERVE_PIP)
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as e:
        raise BadInputError(f"{source} is not a valid Triton model config ({e})",
                            "fix the file or rewrite it with `idle-export serve repo`") from None


def validate_config(text: str, cfg: RepoConfig) -> bool:
    """Parse the rendered text back and compare it with `cfg`. False when no parser is installed."""
    if model_config_pb2() is None:
        return False
    pb = parse_config(text)
    pb2 = model_config_pb2()
    dtype_name = pb2.DataType.Name
    kind_name = pb2.ModelInstanceGroup.Kind.Name
    parsed = {
        "name": pb.name, "platform": pb.platform, "max_batch_size": pb.max_batch_size,
        "num_versions": pb.version_policy.latest.num_versions,
        "inputs": [(t.name, dtype_name(t.data_type), list(t.dims), "", t.optional,
                    list(t.reshape.shape) if t.HasField("reshape") else None) for t in pb.input],
        "outputs": [(t.name, dtype_name(t.data_type), list(t.dims), t.label_filename) for t in pb.output],
        "preferred": list(pb.dynamic_batching.preferred_batch_size),
        "delay": pb.dynamic_batching.max_queue_delay_microseconds,
        "instances": [(g.count, kind_name(g.kind)) for g in pb.instance_group],
        "parameters": {k: v.string_value for k, v in pb.parameters.items()},
        "accelerator": _accelerator(pb),
    }
    wanted = {
        "name": cfg.name, "platform": cfg.platform, "max_batch_size": cfg.max_batch_size,
        "num_versions": cfg.num_versions,
        "inputs": [(t.name, t.data_type, t.dims, t.label_filename or "", t.optional, t.reshape)
                   for t in cfg.inputs],
        "outputs": [(t.name, t.data_type, t.dims, t.label_filename or "") for t in cfg.outputs],
        "preferred": cfg.preferred_batch_sizes, "delay": cfg.max_queue_delay_us,
        "instances": [(cfg.instance_count, cfg.instance_kind)], "parameters": cfg.parameters,
        "accelerator": (cfg.accelerator, cfg.accelerator_parameters) if cfg.accelerator else None,
    }
    for key in wanted:
        if parsed[key] != wanted[key]:
            raise IdleExportError(f"config.pbtxt field {key} reads back as {parsed[key]!r}, "
                                  f"not {wanted[key]!r}", "report this as a bug")
    return True


def sanitize_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"
    return name


def _accelerator(pb) -> tuple[str, dict[str, str]] | None:
    ea = pb.optimization.execution_accelerators
    found = [*ea.gpu_execution_accelerator, *ea.cpu_execution_accelerator]
    return (found[0].name, dict(found[0].parameters)) if found else None




def accelerator_warnings(meta: OnnxMetadata, accelerator: str | None, file_name: str) -> list[str]:
    """A warning when the file was written for another runtime than the accelerator: ONNX
    Runtime-only ops (`--target ort`) or INT8 calibrated for another runtime. Triton's ONNX Runtime
    backend still runs it, the nodes the accelerator cannot take on its default provider."""
    runtime = registry.for_accelerator(accelerator) if accelerator else None
    if runtime is None:
        return []
    target = runtime.target
    if runs_on(meta, target):
        return []
    if meta.precision == "int8":
        made_for = (meta.get("quantization") or {}).get("target") or "another runtime"
        calibrate = f"`idle-export calibrate --target {CALIBRATE_TARGET.get(target, target)}`"
        why, fix = f"its INT8 graph was calibrated for {made_for}", f"{calibrate} on the FP32 file"
    else:
        why, fix = (f"it was written for --target {file_target(meta)} (ONNX Runtime-only ops)",
                    f"`idle-export onnx --target {target}`")
    return [f"{file_name} is not made for the {accelerator} accelerator: {why}; the nodes it cannot take "
            f"run on ONNX Runtime's default provider. For the accelerator, write the file with {fix}"]


def int8_cpu_warnings(meta: OnnxMetadata, accelerator: str | None, kind: str, file_name: str) -> list[str]:
    """A warning when Triton's ONNX Runtime backend would run 8-bit INT8 weights on its CPU
    provider: it cannot set session.x64quantprecision, so on x86 CPUs without VNNI the u8×s8
    products saturate (quantize.recipes.WEIGHT_RANGES); `calibrate`'s 7-bit weights (ort's default)
    cannot. Files of other tools (no recipe recorded) are not judged."""
    recipe = meta.get("quantization") or {}
    if (meta.precision != "int8" or accelerator is not None or kind == "gpu"
            or recipe.get("target") not in ("ort", "trt") or recipe.get("weight_range") == "reduced"):
        return []
    return [f"{file_name} has 8-bit INT8 weights: on an x86 CPU without VNNI (lscpu: no avx512_vnni, "
            "avx_vnni or amx_int8) Triton's ONNX Runtime backend multiplies them with products that "
            "saturate, and it cannot set session.x64quantprecision; for such servers calibrate with "
            "`idle-export calibrate --target ort` (7-bit weights) (docs/int8.md#cpus-without-vnni)"]


def accelerator_parameters(accelerator: str | None, precision: str, is_plan: bool,
                            kind: str) -> dict[str, str]:
    """The execution accelerator's parameters in config.pbtxt (Triton's ONNX Runtime backend)."""
    if accelerator is None:
        return {}
    if accelerator not in ACCELERATORS:
        raise BadInputError(f"accelerator={accelerator!r} is not one of {', '.join(ACCELERATORS)}",
                            "use accelerator=tensorrt (GPU) or openvino (CPU)")
    if is_plan:
        raise BadInputError("accelerator= is for ONNX models (Triton's ONNX Runtime backend); an "
                            "engine is TensorRT already", "drop accelerator=, or pass the ONNX file")
    if accelerator == "openvino":
        if kind == "gpu":
            raise BadInputError("the openvino accelerator runs on CPU instances", "use kind=cpu or auto")
        return {}
    if kind == "cpu":
        raise BadInputError("the tensorrt accelerator needs GPU instances", "use kind=gpu or auto")
    if precision not in ("fp16", "fp32"):
        raise BadInputError(f"accelerator_precision={precision!r} is not fp16 or fp32",
                            "use accelerator_precision=fp16")
    # the engine is built by the server on its own GPU, the first time the model loads
    return {"precision_mode": precision.upper(), "max_workspace_size_bytes": str(1 << 30)}
