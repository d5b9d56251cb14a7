"""ENGINE.json beside every engine: what built it, for which GPU and precision, from which ONNX;
the checks that need no GPU (sha256, RTX header), runtime compatibility, the trtexec equivalent."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.trt.flavour import FLAVOUR_NAMES, PIP, TrtInfo

SIDECAR_FORMAT = "idle-export-engine/1"


RTX_MAGIC = b"vtrt"


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def trtexec_command(sidecar: dict, parsed: Path, output: Path, trt: TrtInfo, timing_cache, verbose) -> str:
    """The equivalent command line of NVIDIA's CLI (trtexec, or tensorrt_rtx for RTX)."""
    p = sidecar["profiles"][0]
    shape = lambda s: "x".join(str(v) for v in s)  # noqa: E731
    tool = "tensorrt_rtx" if trt.flavour == "tensorrt_rtx" else "trtexec"
    el = sidecar.get("elastic")  # the shape input's values (trtexec: NAME:VALUE for shape tensors)
    extra = {k: f",{el['input']}:{el[k]}" if el else "" for k in ("min", "opt", "max")}
    args = [tool, f"--onnx={parsed}", f"--saveEngine={output}",
            f"--minShapes={p['input']}:{shape(p['min'])}{extra['min']}",
            f"--optShapes={p['input']}:{shape(p['opt'])}{extra['opt']}",
            f"--maxShapes={p['input']}:{shape(p['max'])}{extra['max']}"]
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
