"""TensorRT engines: one builder for TensorRT 10 (builder flags), TensorRT 11 and TensorRT-RTX
(strongly typed: the precision is written into the ONNX), a sidecar ENGINE.json, and TrtRunner.

Flavours, chosen in this order unless `flavour=` / IDLE_EXPORT_TRT says otherwise:
  tensorrt       TensorRT 10.x: FP32 ONNX + BuilderFlag.FP16/INT8; the score path is pinned to
                 FP32 with layer precision constraints. TensorRT 11+: strongly typed, like RTX.
                 Builds for the GPU in the machine (needs one).
  tensorrt_rtx   TensorRT-RTX: always strongly typed; builds without a GPU, for one target
                 (`target="sm89"`) or portable (all Ampere and later RTX GPUs).
Strongly typed FP16 builds take the graph of `surgery.convert_fp16` (written beside the engine
as NAME.fp16.onnx); INT8 takes an ONNX with Q/DQ nodes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idle_export import __version__
from idle_export.errors import BadInputError, IdleExportError, MissingDependencyError
from idle_export.model.checkpoint import sha256_file as file_sha256
from idle_export.runtime.runners import SELECTION_PREFIX, Runner

PRECISIONS = ("fp32", "fp16", "int8")
FLAVOURS = ("tensorrt", "tensorrt_rtx")
FLAVOUR_NAMES = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
PIP = {
    "tensorrt": "pip install tensorrt (TensorRT 10/11, builds and runs on an NVIDIA GPU)",
    "tensorrt_rtx": "pip install tensorrt-rtx-cu13==1.7.1.116 (builds without a GPU: --target sm89)",
}
SIDECAR_FORMAT = "idle-export-engine/1"
RTX_MAGIC = b"vtrt"
# Harmless on a machine without GPU: the RTX builder probes the driver, then cross-builds.
_NO_GPU_NOISE = ("CUDA driver version is insufficient", "Error reading CUDA GPU properties",
                 "no CUDA-capable device", "cudaError 35", "cudaError 100")


# ----------------------------------------------------------------------------- TensorRT import
@dataclass(frozen=True)
class TrtInfo:
    """The TensorRT module found: flavour ('tensorrt'|'tensorrt_rtx') and version."""

    module: object
    flavour: str
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def strongly_typed(self) -> bool:
        """RTX always; TensorRT from 11 on (builder flags for FP16/INT8 are gone)."""
        return self.flavour == "tensorrt_rtx" or self.major >= 11

    @property
    def label(self) -> str:
        return f"{FLAVOUR_NAMES[self.flavour]} {self.version}"


def import_trt(flavour: str | None = None) -> TrtInfo:
    """Import TensorRT lazily; `flavour` None tries tensorrt, then tensorrt_rtx."""
    import importlib

    flavour = flavour or os.environ.get("IDLE_EXPORT_TRT") or None
    if flavour is not None and flavour not in FLAVOURS:
        raise BadInputError(f"unknown TensorRT flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
    reasons = []
    for name in ([flavour] if flavour else list(FLAVOURS)):
        try:
            mod = importlib.import_module(name)
        except ImportError as e:  # also None in sys.modules, broken shared libraries
            reasons.append(f"{name}: {str(e).splitlines()[0] if str(e) else 'not installed'}")
            continue
        return TrtInfo(mod, name, str(getattr(mod, "__version__", "0")))
    wanted = [flavour] if flavour else list(FLAVOURS)
    raise MissingDependencyError(
        f"no TensorRT found ({'; '.join(reasons)})",
        " or ".join(PIP[f] for f in wanted))


# ----------------------------------------------------------------------------- CUDA (driver API)
class Cuda:
    """The few CUDA driver calls a runner needs, through ctypes (no cuda-python, no pycuda).
    TensorRT uses the runtime API, which shares the device's primary context used here."""

    def __init__(self, device: int = 0):
        lib = None
        for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise MissingDependencyError("running a TensorRT engine needs an NVIDIA GPU: no CUDA driver "
                                         "(libcuda) on this machine",
                                         "run it on a machine with an NVIDIA GPU and driver; engines "
                                         "can be built here with --target smXX")
        self.lib = lib
        rc = lib.cuInit(0)
        count = ctypes.c_int(0)
        if rc == 0:
            rc = lib.cuDeviceGetCount(ctypes.byref(count))
        if rc != 0 or count.value == 0:
            raise MissingDependencyError(f"running a TensorRT engine needs an NVIDIA GPU: CUDA reports "
                                         f"{'no device' if rc == 0 else f'error {rc}'}",
                                         "check nvidia-smi, or run on a machine with an NVIDIA GPU")
        self.device = ctypes.c_int(0)
        self._check(lib.cuDeviceGet(ctypes.byref(self.device), device), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device),
                    "cuDevicePrimaryCtxRetain")
        self._check(lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise IdleExportError(f"CUDA {what} failed with error {rc}", "check the GPU with nvidia-smi")

    def compute_capability(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), 75, self.device), "attribute")
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, self.device), "attribute")
        return f"sm{major.value}{minor.value}"

    def name(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.lib.cuDeviceGetName(buf, 256, self.device)
        return buf.value.decode(errors="replace")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), max(int(nbytes), 1)), "cuMemAlloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ptr)

    def htod(self, ptr: int, array: np.ndarray) -> None:
        self._check(self.lib.cuMemcpyHtoD_v2(ptr, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")

    def dtoh(self, array: np.ndarray, ptr: int) -> None:
        self._check(self.lib.cuMemcpyDtoH_v2(array.ctypes.data, ptr, array.nbytes), "cuMemcpyDtoH")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._check(self.lib.cuStreamCreate(ctypes.byref(s), 0), "cuStreamCreate")
        return s.value or 0

    def synchronize(self, stream: int) -> None:
        self._check(self.lib.cuStreamSynchronize(ctypes.c_void_p(stream)), "cuStreamSynchronize")


def gpu_info() -> dict | None:
    """{'name', 'compute_capability'} of GPU 0, or None when there is no usable GPU."""
    try:
        cuda = Cuda()
        return {"name": cuda.name(), "compute_capability": cuda.compute_capability()}
    except IdleExportError:
        return None


# ----------------------------------------------------------------------------- options
def parse_batch(text: str) -> tuple[int, int, int]:
    """'1:32:64' → (1, 32, 64); '8' → (8, 8, 8); 'min:max' → (min, max, max)."""
    parts = [p for p in str(text).replace(" ", "").split(":")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise BadInputError(f"--batch {text!r} is not MIN:OPT:MAX", "e.g. --batch 1:32:64") from None
    if len(values) == 1:
        values = values * 3
    elif len(values) == 2:
        values = [values[0], values[1], values[1]]
    elif len(values) != 3:
        raise BadInputError(f"--batch {text!r} has {len(values)} numbers", "give MIN:OPT:MAX, e.g. 1:32:64")
    return check_batch(tuple(values))


def check_batch(batch) -> tuple[int, int, int]:
    lo, opt, hi = (int(v) for v in batch)
    if lo < 1:
        raise BadInputError(f"batch range {lo}:{opt}:{hi} starts below 1", "e.g. --batch 1:32:64")
    if not lo <= opt <= hi:
        raise BadInputError(f"batch range {lo}:{opt}:{hi} is inverted (need MIN ≤ OPT ≤ MAX)",
                            f"e.g. --batch {min(lo, opt, hi)}:{sorted((lo, opt, hi))[1]}:{max(lo, opt, hi)}")
    return lo, opt, hi


def parse_target(text: str | None, trt: TrtInfo | None = None) -> str | None:
    """'sm89' / '89' / '8.9' → 'sm89' (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"(?:sm_?)?(\d)\.?(\d{1,2})", text.strip().lower())
    if not m:
        raise BadInputError(f"--target {text!r} is not a compute capability", "e.g. --target sm89")
    target = f"sm{m.group(1)}{m.group(2)}"
    if trt is not None and trt.flavour == "tensorrt_rtx":
        known = [c.lower() for c in trt.module.ComputeCapability.__members__
                 if c.startswith("SM")]
        if target not in known:
            raise BadInputError(f"TensorRT-RTX {trt.version} cannot build for {target}",
                                f"choose one of {', '.join(known)}")
    return target


# ----------------------------------------------------------------------------- ONNX facts
def onnx_facts(model) -> dict:
    """What the builder needs to know about an ONNX graph before parsing it."""
    from onnx import TensorProto

    g = model.graph
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if len(inputs) != 1:
        raise BadInputError(f"the ONNX graph has {len(inputs)} inputs; expected one image input",
                            "export with `idle-export onnx` (input 'images' [B,3,H,W])")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    if len(shape) != 4 or any(s <= 0 for s in shape[1:]):
        raise BadInputError(f"input {inputs[0].name!r} has shape {shape}; expected [B,3,H,W] with fixed "
                            "C,H,W", "export with `idle-export onnx`")
    ops = {n.op_type for n in g.node}
    types = {i.data_type for i in g.initializer} | {
        v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    meta = {p.key: p.value for p in model.metadata_props}
    return {
        "input": inputs[0].name,
        "shape": shape,
        "outputs": [o.name for o in g.output],
        "qdq": bool(ops & {"QuantizeLinear", "DequantizeLinear"}),
        "fp16": TensorProto.FLOAT16 in types,
        "topk": sum(n.op_type == "TopK" for n in g.node),
        "metadata": meta,
    }


def _make_logger(trt: TrtInfo, verbose: bool, echo: Callable[[str], None]):
    mod = trt.module
    sev = mod.ILogger.Severity

    class CapturingLogger(mod.ILogger):
        """Keeps every message (for one-line errors); echoes warnings, or all with -v."""

        def __init__(self):
            mod.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))
            noise = any(s in msg for s in _NO_GPU_NOISE)
            if verbose or (severity in (sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING) and not noise):
                echo(f"[{trt.flavour}] {severity.name}: {msg}")

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in (sev.INTERNAL_ERROR, sev.ERROR)
                    and not any(n in m for n in _NO_GPU_NOISE)]

    return CapturingLogger()


# ----------------------------------------------------------------------------- build
def default_engine_path(onnx: str | Path, precision: str) -> Path:
    onnx = Path(onnx)
    stem = onnx.name[:-5] if onnx.name.endswith(".onnx") else onnx.name
    return onnx.with_name(f"{stem}.{precision}.engine")


def build_engine(onnx: str | Path, *, precision: str = "fp16", batch=(1, 32, 64), target: str | None = None,
                 timing_cache: str | Path | None = None, workspace: int | None = None,
                 verbose: bool = False, output: str | Path | None = None, flavour: str | None = None,
                 selection: bool = False, echo: Callable[[str], None] | None = None) -> dict:
    """Build ENGINE (+ ENGINE.json) from an ONNX file; returns the sidecar dict (with timings).

    precision: fp32 | fp16 | int8 (int8 needs Q/DQ nodes in the ONNX); batch: (min, opt, max);
    target: compute capability for a TensorRT-RTX cross-build ('sm89'); workspace in MiB;
    selection: also output each TopK's indices as selection_layer{L} (for parity checks).
    """
    from idle_export.fileio import atomic_write_bytes
    from idle_export.onnx.export import check_output_path
    from idle_export.onnx.lint import lint_model
    from idle_export.onnx.surgery import fp16_onnx, score_path_nodes
    from idle_export.runtime.runners import load_onnx

    echo = echo or (lambda s: None)
    if precision not in PRECISIONS:
        raise BadInputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                            "pass --fp32, --fp16 or --int8")
    batch = check_batch(batch)
    onnx = Path(onnx)
    output = Path(output) if output is not None else default_engine_path(onnx, precision)
    if output.resolve() == onnx.resolve():
        raise BadInputError("the engine would overwrite the ONNX file", "pass -o NAME.engine")
    check_output_path(output)
    if workspace is not None and workspace < 1:
        raise BadInputError(f"--workspace {workspace} MiB must be at least 1", "e.g. --workspace 4096")
    model = load_onnx(onnx)
    facts = onnx_facts(model)
    _check_precision(onnx, facts, precision)
    if facts["shape"][0] > 0 and batch != (facts["shape"][0],) * 3:
        b = facts["shape"][0]
        raise BadInputError(f"{onnx.name} has a fixed batch of {b}; --batch {':'.join(map(str, batch))} "
                            "needs a dynamic one", f"pass --batch {b}:{b}:{b} or export with dynamic batch")
    errors = [f for f in lint_model(model) if f["severity"] == "error"]
    if errors:
        raise BadInputError(f"{onnx.name}: {errors[0]['message']}"
                            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                            f"run `idle-export lint {onnx}` for every finding")

    if flavour is None and target is not None and not os.environ.get("IDLE_EXPORT_TRT"):
        import importlib.util

        if importlib.util.find_spec("tensorrt_rtx") is not None:
            flavour = "tensorrt_rtx"  # --target means a cross-build: only RTX does that
    trt = import_trt(flavour)
    echo(f"using {trt.label} ({'strongly typed' if trt.strongly_typed else 'builder flags'})")
    target = parse_target(target, trt)
    gpu = None
    if trt.flavour == "tensorrt":
        if target is not None:
            raise BadInputError(f"--target {target}: {trt.label} builds only for the GPU in this machine",
                                f"cross-build with TensorRT-RTX: {PIP['tensorrt_rtx']}")
        gpu = gpu_info()
        if gpu is None:
            raise MissingDependencyError(f"{trt.label} needs an NVIDIA GPU to build engines; none found",
                                         f"build without a GPU with TensorRT-RTX: {PIP['tensorrt_rtx']} "
                                         "and pass --target sm89 (or your GPU's)")
    compute_capability = target or (gpu["compute_capability"] if gpu else "portable")

    # The graph the builder parses, and the precision knobs.
    parsed = onnx
    fp16_report = None
    strongly_typed = trt.strongly_typed or (precision == "fp16" and facts["fp16"])
    if precision == "fp16" and strongly_typed and not facts["fp16"]:
        stem = output.name[:-7] if output.name.endswith(".engine") else output.name
        parsed = output.with_name(stem + (".onnx" if stem.endswith(".fp16") else ".fp16.onnx"))
        if parsed.resolve() == onnx.resolve():  # never overwrite the source
            parsed = output.with_name(stem + ".typed.onnx")
        echo(f"strongly typed FP16: writing {parsed.name} (scores/TopK FP32, indices INT64)")
        fp16_report = fp16_onnx(model, parsed)  # the model loaded above, not the file again
    fp32_layers = sorted(score_path_nodes(model)) if precision == "fp16" and not strongly_typed else []

    mod = trt.module
    logger = _make_logger(trt, verbose, echo)
    builder = mod.Builder(logger)
    flags = 0
    if strongly_typed and trt.flavour == "tensorrt" and hasattr(mod.NetworkDefinitionCreationFlag,
                                                                 "STRONGLY_TYPED"):
        flags = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = mod.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(parsed)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errs[0] if errs else None
        where = f"node {first.node_name()} ({first.node_operator()}): " if first and first.node_name() else ""
        desc = first.desc() if first else (logger.errors() or ["unknown error"])[0]
        raise BadInputError(f"{trt.label}'s ONNX parser rejected {parsed.name}: {where}{desc}",
                            f"run `idle-export lint {parsed}`; rerun with -v for the parser log")
    selection_outputs = _mark_selection(mod, network, facts) if selection else []
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    chw = tuple(facts["shape"][1:])
    profile.set_shape(name, (batch[0], *chw), (batch[1], *chw), (batch[2], *chw))
    config.add_optimization_profile(profile)
    if workspace is not None:
        config.set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE, int(workspace) << 20)
    if precision == "fp32" and hasattr(mod.BuilderFlag, "TF32"):
        config.clear_flag(mod.BuilderFlag.TF32)  # FP32 means FP32 (trtexec: --noTF32)
    if not strongly_typed:
        if precision == "fp16":
            config.set_flag(mod.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(mod.BuilderFlag.INT8)
        if fp32_layers:
            _pin_fp32(mod, network, config, set(fp32_layers))
    if target is not None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(mod.ComputeCapability, target.upper()), 0)
    cache_note = _load_timing_cache(trt, config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        errs = logger.errors()
        raise IdleExportError(f"{trt.label} could not build {parsed.name}: "
                              f"{errs[-1] if errs else 'no error message'}",
                              "rerun with -v for the builder log; check `idle-export lint`")
    data = bytes(plan)
    if timing_cache is not None and trt.flavour == "tensorrt":
        atomic_write_bytes(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    io = [_tensor_desc(network.get_input(i)) for i in range(network.num_inputs)] + \
         [_tensor_desc(network.get_output(i)) for i in range(network.num_outputs)]
    sidecar = {
        "format": SIDECAR_FORMAT,
        "engine": output.name,
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "engine_bytes": len(data),
        "flavour": trt.flavour,
        "trt_version": trt.version,
        "strongly_typed": bool(strongly_typed),
        "compute_capability": compute_capability,
        "gpu": gpu["name"] if gpu else None,
        "precision": precision,
        "profiles": [{"input": name, "min": [batch[0], *chw], "opt": [batch[1], *chw],
                      "max": [batch[2], *chw]}],
        "io": io,
        "onnx": {"path": onnx.name, "sha256": file_sha256(onnx)},
        "built_from": {"path": parsed.name, "sha256": file_sha256(parsed)} if parsed != onnx else None,
        "fp16_pass": fp16_report and {k: v for k, v in fp16_report.items() if k != "path"},
        "fp32_layers": fp32_layers,
        "selection_outputs": selection_outputs,
        "workspace_mib": workspace,
        "timing_cache": cache_note,
        "build_seconds": round(seconds, 2),
        "tool_version": __version__,
        "model": {k: v for k, v in facts["metadata"].items() if k.startswith("idle_export.")},
    }
    sidecar["trtexec"] = trtexec_command(sidecar, parsed, output, trt, timing_cache, verbose)
    atomic_write_bytes(output, data)
    atomic_write_bytes(sidecar_path(output), (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


def _check_precision(onnx: Path, facts: dict, precision: str) -> None:
    if precision == "int8" and not facts["qdq"]:
        raise BadInputError(f"INT8 needs a Q/DQ ONNX: {onnx.name} has no QuantizeLinear/DequantizeLinear "
                            "nodes", f"run `idle-export calibrate {onnx}` first, or pass --calib DIR")
    if precision != "int8" and facts["qdq"]:
        raise BadInputError(f"{onnx.name} has Q/DQ nodes (an INT8 graph); --{precision} would ignore them",
                            "pass --int8, or build from the FP32 export")
    if precision == "fp32" and facts["fp16"]:
        raise BadInputError(f"{onnx.name} has FP16 tensors; a strongly typed build would run them in FP16",
                            "pass --fp16, or build --fp32 from the FP32 export")


def _mark_selection(mod, network, facts: dict) -> list[str]:
    """Make each TopK's index tensor an engine output named selection_layer{L} (idle layer L)."""
    topk = [network.get_layer(i) for i in range(network.num_layers)
            if network.get_layer(i).type == mod.LayerType.TOPK]
    meta = facts["metadata"]
    layers = json.loads(meta["idle_export.idle_layers"]) if "idle_export.idle_layers" in meta else []
    if len(layers) != len(topk):
        layers = list(range(len(topk)))
    names = []
    for layer_index, layer in zip(layers, topk, strict=True):
        tensor = layer.get_output(1)
        tensor.name = f"{SELECTION_PREFIX}{layer_index}"
        network.mark_output(tensor)
        names.append(tensor.name)
    return names


def _pin_fp32(mod, network, config, node_names: set[str]) -> int:
    """TensorRT 10 with BuilderFlag.FP16: keep the layers of the score path in FP32."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in node_names or layer.type == mod.LayerType.TOPK:  # parser: layer = node name
            layer.precision = mod.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (mod.float32, mod.float16):
                    layer.set_output_type(j, mod.float32)
            pinned += 1
    if pinned:
        config.set_flag(mod.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return pinned


def _load_timing_cache(trt: TrtInfo, config, path) -> str | None:
    if path is None:
        return None
    if trt.flavour == "tensorrt_rtx":
        return "not used: timing caches are no-ops in TensorRT-RTX (it compiles kernels at run time)"
    path = Path(path)
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False
    return f"{'reused' if blob else 'created'} {path}"


def _tensor_desc(t) -> dict:
    return {"name": t.name, "dtype": str(t.dtype).split(".")[-1].lower(), "shape": list(t.shape),
            "mode": "input" if t.is_network_input else "output"}


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def trtexec_command(sidecar: dict, parsed: Path, output: Path, trt: TrtInfo, timing_cache, verbose) -> str:
    """The equivalent command line of NVIDIA's CLI (trtexec, or tensorrt_rtx for RTX)."""
    p = sidecar["profiles"][0]
    shape = lambda s: "x".join(str(v) for v in s)  # noqa: E731
    tool = "tensorrt_rtx" if trt.flavour == "tensorrt_rtx" else "trtexec"
    args = [tool, f"--onnx={parsed}", f"--saveEngine={output}",
            f"--minShapes={p['input']}:{shape(p['min'])}", f"--optShapes={p['input']}:{shape(p['opt'])}",
            f"--maxShapes={p['input']}:{shape(p['max'])}"]
    if trt.flavour == "tensorrt":
        if sidecar["strongly_typed"]:
            args.append("--stronglyTyped")
        elif sidecar["precision"] == "fp16":
            args.append("--fp16")
            if sidecar["fp32_layers"]:
                args += ["--precisionConstraints=prefer",
                         "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in sidecar["fp32_layers"])]
        elif sidecar["precision"] == "int8":
            args.append("--int8")
        if sidecar["precision"] == "fp32":
            args.append("--noTF32")
        if timing_cache:
            args.append(f"--timingCacheFile={timing_cache}")
    if sidecar["workspace_mib"]:
        args.append(f"--memPoolSize=workspace:{sidecar['workspace_mib']}M")
    if verbose:
        args.append("--verbose")
    line = " ".join(shlex.quote(a) for a in args)
    if trt.flavour == "tensorrt_rtx" and sidecar["compute_capability"] != "portable":
        line += (f"   # built for {sidecar['compute_capability']} only via the Python API "
                 "(config.set_compute_capability)")
    return line


# ----------------------------------------------------------------------------- inspect
def read_sidecar(engine: str | Path) -> dict:
    """The sidecar of an engine, with one-line errors for every way it can be missing or stale."""
    engine = Path(engine)
    if not engine.is_file():
        raise BadInputError(f"engine not found: {engine}",
                            "check the path, or build it with `idle-export trt`")
    side = sidecar_path(engine)
    if not side.is_file():
        raise BadInputError(f"{engine.name} has no sidecar {side.name}: its TensorRT version and GPU "
                            "are unknown",
                            "rebuild it with `idle-export trt` (keep NAME.engine.json beside the engine)")
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, ValueError):
        raise BadInputError(f"{side.name} is not valid JSON",
                            "rebuild the engine with `idle-export trt`") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise BadInputError(f"{side.name} is not an idle-export engine sidecar ({SIDECAR_FORMAT})",
                            "rebuild the engine with `idle-export trt`")
    return sidecar


def inspect_engine(engine: str | Path) -> dict:
    """Checks that need no GPU: sidecar present and matching the engine bytes, file header of an
    RTX engine (magic, builder version). Returns the sidecar plus 'checks'."""
    engine = Path(engine)
    sidecar = read_sidecar(engine)
    data = engine.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar.get("engine_sha256"):
        raise BadInputError(f"{engine.name} does not match its sidecar (sha256 differs: the engine was "
                            "replaced or truncated)", "rebuild it with `idle-export trt`")
    checks = ["sidecar matches engine sha256"]
    if sidecar.get("flavour") == "tensorrt_rtx":
        if data[:4] != RTX_MAGIC:
            raise BadInputError(f"{engine.name} does not start like a TensorRT-RTX engine",
                                "rebuild it with `idle-export trt`")
        header_version = ".".join(str(b) for b in data[24:27])
        if not sidecar.get("trt_version", "").startswith(header_version + "."):
            raise BadInputError(f"{engine.name}: header says TensorRT-RTX {header_version}, sidecar says "
                                f"{sidecar.get('trt_version')}", "rebuild it with `idle-export trt`")
        checks.append(f"TensorRT-RTX header, builder {header_version}")
    return {**sidecar, "checks": checks}


def compatibility_problems(sidecar: dict, trt: TrtInfo | None, gpu_cc: str | None) -> list[str]:
    """Why this runtime cannot run the engine (empty when it can). gpu_cc: e.g. 'sm89'."""
    flavour = sidecar.get("flavour")
    label = f"{FLAVOUR_NAMES.get(flavour, flavour)} {sidecar.get('trt_version')}"
    problems = []
    if trt is not None:
        if trt.flavour != sidecar.get("flavour") or trt.version != sidecar.get("trt_version"):
            problems.append(f"engine was built with {label}; this runtime is {trt.label}")
    if gpu_cc is not None:
        cc = sidecar.get("compute_capability")
        if cc == "portable":
            n = int(gpu_cc[2:])
            if not (n in (80, 86, 87, 89) or n >= 120):
                problems.append(f"portable TensorRT-RTX engines run on RTX-class GPUs (sm80/86/89/120+); "
                                f"this GPU is {gpu_cc} (build with TensorRT: {PIP['tensorrt']})")
        elif cc != gpu_cc:
            problems.append(f"engine was built for {cc}; this GPU is {gpu_cc}")
    return problems


# ----------------------------------------------------------------------------- runner
class TrtRunner(Runner):
    """A TensorRT engine on GPU 0 (Polygraphy's shape: `with r: out = r.infer({"images": x})`).

    Refuses, with a one-line error, an engine whose sidecar does not match the runtime
    (flavour/version, compute capability) and, without a GPU, raises MissingDependencyError.
    """

    def __init__(self, engine: str | Path, *, name: str | None = None):
        self.path = Path(engine)
        self.name = name or f"tensorrt:{self.path.name}"
        self.sidecar: dict = {}
        self._buffers: dict[str, int] = {}
        self.cuda = None

    def activate(self) -> None:
        self.sidecar = inspect_engine(self.path)
        flavour = self.sidecar.get("flavour")
        try:
            trt = import_trt(flavour)
        except MissingDependencyError:
            pin = "tensorrt-rtx-cu13" if flavour == "tensorrt_rtx" else "tensorrt"
            raise MissingDependencyError(
                f"{self.path.name} needs {FLAVOUR_NAMES.get(flavour, flavour)} "
                f"{self.sidecar.get('trt_version')}, which is not installed",
                f"pip install {pin}=={self.sidecar.get('trt_version')}") from None
        problems = compatibility_problems(self.sidecar, trt, None)
        if problems:
            raise BadInputError(f"{self.path.name}: {problems[0]}", "rebuild it with `idle-export trt` here")
        self.cuda = Cuda()  # MissingDependencyError without a GPU
        problems = compatibility_problems(self.sidecar, None, self.cuda.compute_capability())
        if problems:
            raise BadInputError(f"{self.path.name}: {problems[0]}",
                                "rebuild it on this machine (or with --target for this GPU)")
        mod = trt.module
        self.logger = _make_logger(trt, False, lambda s: None)
        self.runtime = mod.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            errs = self.logger.errors()
            raise IdleExportError(f"{trt.label} could not load {self.path.name}: "
                                  f"{errs[-1] if errs else 'unknown error'}",
                                  "rebuild it with `idle-export trt`")
        self.context = self.engine.create_execution_context()
        self.trt = trt
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == mod.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.max_batch = self.sidecar["profiles"][0]["max"][0]
        self.min_batch = self.sidecar["profiles"][0]["min"][0]
        self.input_name = self.inputs[0]
        self.context.set_input_shape(self.input_name, tuple(self.sidecar["profiles"][0]["max"]))
        for n in self.names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = np.dtype(mod.nptype(self.engine.get_tensor_dtype(n)))
            self._buffers[n] = self.cuda.malloc(int(np.prod(shape)) * dtype.itemsize)
        self.stream = self.cuda.stream()

    def deactivate(self) -> None:
        if self.cuda is not None:
            for ptr in self._buffers.values():
                self.cuda.free(ptr)
        self._buffers = {}
        self.context = self.engine = None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mod = self.trt.module
        x = np.ascontiguousarray(feed["images"], dtype=np.float32)
        if not self.min_batch <= x.shape[0] <= self.max_batch:
            raise BadInputError(f"batch {x.shape[0]} is outside the engine's profile "
                                f"{self.min_batch}..{self.max_batch}",
                                "rebuild with a wider --batch MIN:OPT:MAX")
        self.context.set_input_shape(self.input_name, x.shape)
        self.cuda.htod(self._buffers[self.input_name], x)
        for n in self.names:
            self.context.set_tensor_address(n, self._buffers[n])
        if not self.context.execute_async_v3(self.stream):
            raise IdleExportError(f"{self.trt.label} failed to run {self.path.name}", "rerun with --debug")
        self.cuda.synchronize(self.stream)
        out = {}
        for n in self.outputs:
            arr = np.empty(tuple(self.context.get_tensor_shape(n)),
                           dtype=np.dtype(mod.nptype(self.engine.get_tensor_dtype(n))))
            self.cuda.dtoh(arr, self._buffers[n])
            out[n] = arr
        return out


# ----------------------------------------------------------------------------- check
def check_engine_against(engine: str | Path, onnx_path: str | Path, *, batch_sizes=(1, 7, 32),
                         input_sets=("noise", "photos"), tol=None, seed: int = 0,
                         threads: int | None = None) -> dict:
    """`idle-export check X.engine --against Y.onnx`: TensorRT on the GPU against ONNX Runtime
    (FP32, CPU) on the same inputs, with the tolerance of the engine's precision."""
    from idle_export.data.inputs import input_set
    from idle_export.model.config import TOLERANCES, ModelSpec
    from idle_export.parity.compare import compare_runners
    from idle_export.runtime.runners import OrtRunner, load_onnx

    info = inspect_engine(engine)  # sidecar problems surface before the GPU question
    spec = ModelSpec.from_metadata({p.key: p.value for p in load_onnx(onnx_path).metadata_props})
    lo, hi = info["profiles"][0]["min"][0], info["profiles"][0]["max"][0]
    sizes = [b for b in batch_sizes if lo <= b <= hi] or [hi]
    warnings = []
    if info.get("onnx", {}).get("sha256") != file_sha256(onnx_path):
        warnings.append(f"{Path(engine).name} was built from {info['onnx']['path']}, not from "
                        f"{Path(onnx_path).name} (sha256 differs)")
    inputs = {name: input_set(name, max(sizes), spec, seed=seed) for name in input_sets}
    tol = tol or TOLERANCES[info["precision"]]
    selection = bool(info.get("selection_outputs"))
    report = compare_runners(TrtRunner(engine), OrtRunner(onnx_path, selection=selection, threads=threads),
                             inputs, sizes, tol)
    report["model"] = spec.describe()
    report["engine"] = {k: info[k] for k in ("flavour", "trt_version", "precision", "compute_capability")}
    report["warnings"] = warnings
    return report
