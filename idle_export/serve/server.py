"""Serving: a Triton model repository, a local pytriton launcher and a KServe-v2 HTTP client.

Three steps, each usable alone:

- `write_repository(model, out)`: `out/NAME/config.pbtxt` + `out/NAME/<version>/model.onnx` (or
  `model.plan` for a TensorRT engine with its `.json` sidecar), `labels.txt` when the model knows
  its class names, `idle_export.json` (the model's idle-export metadata). The folder is built in a
  temporary folder and renamed into place; config.pbtxt is parsed back with Triton's own protobuf
  (`tritonclient.grpc.model_config_pb2`) and compared field by field with what we meant to write.
- `serve_repository(repo, port=...)`: serves the ONNX models of such a repository on this machine
  with nvidia-pytriton (the real Triton core and its dynamic batcher; inference by ONNX Runtime on
  the CPU), HTTP on 127.0.0.1 by default; stops cleanly on SIGINT/SIGTERM.
- `query(url, images)`: preprocesses image files exactly like `check` (timm eval transform) and
  returns top-k classes and latency from any Triton server that serves the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from idle_export import __version__
from idle_export.errors import BadInputError, IdleExportError, MissingDependencyError
from idle_export.model.checkpoint import sha256_file

CONFIG_NAME = "config.pbtxt"
LABELS_NAME = "labels.txt"
SIDECAR_NAME = "idle_export.json"
ONNX_PLATFORM = "onnxruntime_onnx"
PLAN_PLATFORM = "tensorrt_plan"
DEFAULT_FILENAMES = {ONNX_PLATFORM: "model.onnx", PLAN_PLATFORM: "model.plan"}
PLAN_SUFFIXES = (".engine", ".plan")
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
SERVE_PIP = "pip install 'idle-export[serve]' (nvidia-pytriton, tritonclient[http])"
# Endpoints that need pytriton's access token. model-repository (the model index the client uses)
# and statistics (request counts) stay open, as in a stock Triton; the server binds 127.0.0.1.
RESTRICTED_ENDPOINTS = ["shared-memory", "trace", "logging"]

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
    dims: list[int]  # without the batch dimension
    label_filename: str | None = None


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
            lines.append("  }," if i + 1 < len(items) else "  }")
        lines.append("]")

    tensors("input", cfg.inputs)
    tensors("output", cfg.outputs)
    lines += ["dynamic_batching {",
              f"  preferred_batch_size: [ {', '.join(str(b) for b in cfg.preferred_batch_sizes)} ]",
              f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}", "}",
              f"instance_group [ {{ count: {cfg.instance_count}, kind: {cfg.instance_kind} }} ]"]
    for key, value in cfg.parameters.items():
        lines.append(f"parameters {{ key: {_pb_string(key)} "
                     f"value: {{ string_value: {_pb_string(value)} }} }}")
    return "\n".join(lines) + "\n"


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
        "inputs": [(t.name, dtype_name(t.data_type), list(t.dims), "") for t in pb.input],
        "outputs": [(t.name, dtype_name(t.data_type), list(t.dims), t.label_filename) for t in pb.output],
        "preferred": list(pb.dynamic_batching.preferred_batch_size),
        "delay": pb.dynamic_batching.max_queue_delay_microseconds,
        "instances": [(g.count, kind_name(g.kind)) for g in pb.instance_group],
        "parameters": {k: v.string_value for k, v in pb.parameters.items()},
    }
    wanted = {
        "name": cfg.name, "platform": cfg.platform, "max_batch_size": cfg.max_batch_size,
        "num_versions": cfg.num_versions,
        "inputs": [(t.name, t.data_type, t.dims, t.label_filename or "") for t in cfg.inputs],
        "outputs": [(t.name, t.data_type, t.dims, t.label_filename or "") for t in cfg.outputs],
        "preferred": cfg.preferred_batch_sizes, "delay": cfg.max_queue_delay_us,
        "instances": [(cfg.instance_count, cfg.instance_kind)], "parameters": cfg.parameters,
    }
    for key in wanted:
        if parsed[key] != wanted[key]:
            raise IdleExportError(f"config.pbtxt field {key} reads back as {parsed[key]!r}, "
                                  f"not {wanted[key]!r}", "report this as a bug")
    return True


def _onnx_io(path: Path):
    """(inputs, outputs, metadata, external data files) of an ONNX file, weights not loaded."""
    import onnx

    if not path.is_file():
        raise BadInputError(f"ONNX file not found: {path}", "check the path")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - DecodeError and friends
        raise BadInputError(f"{path.name} is not an ONNX model ({type(e).__name__})",
                            "pass a file written by `idle-export onnx`") from None
    init_names = {t.name for t in proto.graph.initializer}

    def tensor(vi, what: str) -> tuple[TensorConfig, bool]:
        tt = vi.type.tensor_type
        dtype = _ONNX_TO_TRITON.get(tt.elem_type)
        if dtype is None:
            raise BadInputError(f"{what} {vi.name!r} of {path.name} has ONNX element type {tt.elem_type}, "
                                "which Triton cannot serve", "export with float32 inputs and outputs")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if not dims:
            raise BadInputError(f"{what} {vi.name!r} of {path.name} has no batch dimension",
                                "export with a dynamic batch dimension (idle-export onnx does)")
        return TensorConfig(vi.name, dtype, dims[1:]), dims[0] == -1

    inputs = [tensor(vi, "input") for vi in proto.graph.input if vi.name not in init_names]
    outputs = [tensor(vi, "output") for vi in proto.graph.output]
    meta = {p.key: p.value for p in proto.metadata_props}
    external = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is None or Path(loc).is_absolute() or ".." in Path(loc).parts:
                raise BadInputError(f"{path.name} stores weights at {loc!r}, outside its folder",
                                    "re-save it with onnx.save_model(..., location='model.onnx.data')")
            external.add(loc)
    return inputs, outputs, meta, sorted(external)


def _metadata_values(meta: dict[str, str]) -> tuple[dict[str, str], list[str] | None]:
    """idle_export.* props (JSON text) to keep as config parameters, and the class names."""
    params = {k: v for k, v in sorted(meta.items()) if k.startswith("idle_export.")}
    classes = None
    if "idle_export.classes" in params:
        try:
            value = json.loads(params["idle_export.classes"])
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(c, str) for c in value):
            classes = value
    return params, classes


def sanitize_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"
    return name


def write_repository(model: str | Path, output: str | Path, *, name: str | None = None,
                     max_batch: int | None = 64, preferred: list[int] | None = None,
                     queue_delay_us: int = 100, instances: int = 1, kind: str | None = None,
                     version: int = 1, onnx: str | Path | None = None,
                     force: bool = False) -> dict:
    """Write `output/NAME/` for an ONNX file or a TensorRT engine (+ the ENGINE.json sidecar that
    `idle-export trt` writes, read and checked by engine.inspect_engine).

    For an engine, tensor names/shapes and metadata come from the ONNX it was built from
    (`onnx=`, or the sidecar's onnx path, beside the engine, when that file exists). Returns a
    report dict.
    """
    model = Path(model)
    output = Path(output)
    if not model.exists():
        raise BadInputError(f"model file not found: {model}", "check the path")
    if model.is_dir():
        raise BadInputError(f"{model} is a folder", "pass the .onnx file or the .engine/.plan file")
    is_plan = model.suffix.lower() in PLAN_SUFFIXES
    if not is_plan and model.suffix.lower() != ".onnx":
        raise BadInputError(f"{model.name}: unknown model type {model.suffix or '(no suffix)'}",
                            "pass an .onnx file (ONNX Runtime) or an .engine/.plan file (TensorRT)")
    name = name or sanitize_name(model.stem)
    if not NAME_RE.match(name):
        raise BadInputError(f"model name {name!r} has characters Triton does not accept",
                            "use letters, digits, '.', '_' and '-' only (--name)")
    if version < 1:
        raise BadInputError(f"--version {version} must be at least 1", "use --version 1")
    if instances < 1:
        raise BadInputError(f"--instances {instances} must be at least 1", "use --instances 1")
    if queue_delay_us < 0:
        raise BadInputError(f"--queue-delay-us {queue_delay_us} is negative", "use e.g. --queue-delay-us 100")
    kind = kind or ("gpu" if is_plan else "auto")
    if kind not in KINDS:
        raise BadInputError(f"--kind {kind!r} is not one of {', '.join(KINDS)}", "use --kind auto")
    if is_plan and kind == "cpu":
        raise BadInputError("a TensorRT plan cannot run on CPU instances", "use --kind gpu")
    if output.exists() and not output.is_dir():
        raise BadInputError(f"output {output} is a file", "give a folder for the model repository")
    parent = output.parent if str(output.parent) else Path(".")
    if not output.exists() and not parent.is_dir():
        raise BadInputError(f"folder {parent} does not exist", f"create it: mkdir -p {parent}")
    final = output / name
    if final.exists() and not force:
        raise BadInputError(f"{final} already exists", "pass --force to replace it, or --name another")

    warnings: list[str] = []
    engine_info: dict = {}
    profile = None
    if is_plan:
        from idle_export.trt.engine import inspect_engine

        side = inspect_engine(model)  # sidecar present, idle-export's format, engine sha256 matches
        source = side.get("onnx") or {}
        if side.get("flavour") == "tensorrt_rtx":
            raise BadInputError(
                f"{model.name} is a TensorRT-RTX engine; Triton's tensorrt_plan backend loads TensorRT "
                "engines only", "build the engine with `tensorrt` on (or for) the serving GPU, or serve "
                "the ONNX file (platform onnxruntime_onnx)")
        onnx = Path(onnx) if onnx else None
        if onnx is None and source.get("path") and (model.parent / source["path"]).is_file():
            onnx = model.parent / source["path"]
        if onnx is None:
            raise BadInputError(f"cannot tell the inputs and outputs of {model.name}",
                                "pass --onnx MODEL.onnx, the ONNX file the engine was built from")
        ins, outs, meta, _ = _onnx_io(onnx)
        if source.get("sha256") and source["sha256"] != sha256_file(onnx):
            raise BadInputError(f"{model.name} was not built from {onnx.name} (ONNX sha256 differs)",
                                "pass the ONNX file the engine was built from with --onnx")
        first = (side.get("profiles") or [None])[0]  # batch = dim 0 of min/opt/max
        profile = tuple(first[k][0] for k in ("min", "opt", "max")) if first else None
        if profile is None:
            warnings.append("the engine sidecar has no optimisation profile: trusting --max-batch")
        engine_info = {k: v for k, v in side.items() if k != "checks"}
    else:
        ins, outs, meta, external = _onnx_io(model)

    dynamic = [t.name for t, dyn in ins + outs if not dyn]
    if dynamic:
        raise BadInputError(f"{model.name} has a fixed batch size ({', '.join(dynamic)})",
                            "export with a dynamic batch dimension (idle-export onnx does)")
    if not ins or not outs:
        raise BadInputError(f"{model.name} has no inputs or no outputs", "pass an exported model")
    for t, _ in ins:
        if any(d < 1 for d in t.dims):
            raise BadInputError(f"input {t.name!r} has a dynamic non-batch dimension {t.dims}",
                                "export with a fixed image size")
    if max_batch is None:
        max_batch = profile[2] if profile else 64
    if max_batch < 1:
        raise BadInputError(f"--max-batch {max_batch} must be at least 1",
                            "Triton batches requests only with max_batch_size >= 1")
    if profile:
        pmin, popt, pmax = profile
        if pmin > 1:
            raise BadInputError(f"the engine's profile starts at batch {pmin}; Triton sends batches of 1 "
                                "and up", "rebuild the engine with --batch 1:OPT:MAX")
        if max_batch > pmax:
            raise BadInputError(f"--max-batch {max_batch} is above the engine's profile maximum {pmax}",
                                f"use --max-batch {pmax} or rebuild the engine for a larger batch")
    if preferred is None:
        opt = profile[1] if profile else max(1, max_batch // 2)
        preferred = sorted({min(opt, max_batch), max_batch})
    preferred = sorted(set(preferred))
    if not preferred or preferred[0] < 1 or preferred[-1] > max_batch:
        raise BadInputError(f"--preferred {','.join(map(str, preferred))} must lie in 1..{max_batch}",
                            f"e.g. --preferred {max(1, max_batch // 2)},{max_batch}")

    params, classes = _metadata_values(meta)
    out_tensors = [t for t, _ in outs]
    if classes is not None:
        logits = next((t for t in out_tensors if t.name == "logits"), out_tensors[0])
        if logits.dims == [len(classes)]:
            logits.label_filename = LABELS_NAME
        else:
            warnings.append(f"{len(classes)} class names but output {logits.name} has dims {logits.dims}: "
                            "no labels file written")
            classes = None
    platform = PLAN_PLATFORM if is_plan else ONNX_PLATFORM
    cfg = RepoConfig(name=name, platform=platform, max_batch_size=max_batch, inputs=[t for t, _ in ins],
                     outputs=out_tensors, preferred_batch_sizes=preferred, max_queue_delay_us=queue_delay_us,
                     instance_count=instances, instance_kind=KINDS[kind], parameters=params,
                     comment=f"written by idle-export {__version__} from {model.name}")
    text = render_config(cfg)
    validated = validate_config(text, cfg)
    if not validated:
        warnings.append("config.pbtxt not parsed back: tritonclient is not installed")

    output.mkdir(exist_ok=True)
    if not os.access(output, os.W_OK | os.X_OK):
        raise BadInputError(f"model repository {output} is not writable", "choose another -o/--output")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=output))
    old = None
    try:
        vdir = tmp / str(version)
        vdir.mkdir()
        model_file = vdir / DEFAULT_FILENAMES[platform]
        shutil.copyfile(model, model_file)
        copied = [model_file.relative_to(tmp).as_posix()]
        if is_plan:
            (vdir / (model_file.name + ".json")).write_text(json.dumps(engine_info, indent=2) + "\n")
            copied.append(f"{version}/{model_file.name}.json")
        else:
            for loc in external:
                src = model.parent / loc
                if not src.is_file():
                    raise BadInputError(f"{model.name} refers to external weights {loc} that are missing",
                                        f"keep {loc} next to {model.name}")
                (vdir / loc).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, vdir / loc)
                copied.append(f"{version}/{loc}")
        (tmp / CONFIG_NAME).write_text(text)
        if classes is not None:
            (tmp / LABELS_NAME).write_text("".join(c.replace("\n", " ") + "\n" for c in classes))
        side_meta = {
            "tool": f"idle-export {__version__}", "source": str(model.resolve()), "platform": platform,
            "sha256": sha256_file(model), "version": version,
            "metadata": {k: _json_or_text(v) for k, v in params.items()},
        }
        if is_plan:
            side_meta["engine"] = engine_info
        (tmp / SIDECAR_NAME).write_text(json.dumps(side_meta, indent=2) + "\n")
        if final.exists():
            old = output / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return {
        "repository": str(output), "name": name, "folder": str(final), "platform": platform,
        "version": version, "max_batch_size": max_batch, "preferred_batch_sizes": preferred,
        "max_queue_delay_us": queue_delay_us, "instance_group": {"count": instances, "kind": KINDS[kind]},
        "inputs": [vars(t) for t in cfg.inputs], "outputs": [vars(t) for t in cfg.outputs],
        "files": [CONFIG_NAME, *([LABELS_NAME] if classes is not None else []), SIDECAR_NAME, *copied],
        "labels": len(classes) if classes else 0, "validated_with_triton_protobuf": validated,
        "warnings": warnings,
    }


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


# ============================================================================ repository reader
@dataclass
class RepoModel:
    name: str
    folder: Path
    config: object  # model_config_pb2.ModelConfig
    version: int
    model_file: Path

    @property
    def platform(self) -> str:
        return self.config.platform or self.config.backend


def read_repository(repo: str | Path, names: list[str] | None = None) -> list[RepoModel]:
    """Models of a Triton model repository (config.pbtxt parsed with Triton's protobuf)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise BadInputError(f"model repository {repo} is not a folder",
                            "write one with `idle-export serve repo MODEL.onnx -o model_repository/`")
    if (repo / CONFIG_NAME).is_file():
        raise BadInputError(f"{repo} is a model folder, not a model repository",
                            f"pass its parent folder: {repo.parent}")
    models = []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            continue
        if names and folder.name not in names:
            continue
        cfg = parse_config(cfg_path.read_text(errors="replace"), str(cfg_path))
        if cfg.name and cfg.name != folder.name:
            raise BadInputError(f"{cfg_path} names the model {cfg.name!r} but its folder is {folder.name!r}",
                                "Triton needs them equal: rename the folder or fix name:")
        platform = cfg.platform or cfg.backend
        filename = cfg.default_model_filename or DEFAULT_FILENAMES.get(platform, "model.onnx")
        versions = sorted((int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                          reverse=True)
        found = next(((v, folder / str(v) / filename) for v in versions
                       if (folder / str(v) / filename).is_file()), None)
        if found is None:
            raise BadInputError(f"{folder.name} has no version folder with {filename}",
                                f"expected {folder}/1/{filename}")
        models.append(RepoModel(folder.name, folder, cfg, found[0], found[1]))
    if names:
        missing = sorted(set(names) - {m.name for m in models})
        if missing:
            raise BadInputError(f"model {', '.join(missing)} not in {repo}",
                                f"models there: {', '.join(m.name for m in models) or '(none)'}")
    if not models:
        raise BadInputError(f"no model in {repo} (no NAME/config.pbtxt)",
                            "write one with `idle-export serve repo MODEL.onnx -o model_repository/`")
    return models


# ============================================================================ launcher (pytriton)
def python_lib_dir() -> str:
    """The folder with libpythonX.Y.so, which pytriton's Python-backend stub needs at run time."""
    return sysconfig.get_config_var("LIBDIR") or os.path.join(sys.base_prefix, "lib")


def fix_library_path(env: dict | None = None) -> bool:
    """Put this Python's lib dir on LD_LIBRARY_PATH (in os.environ unless `env` is given).

    tritonserver and its Python-backend stub are started by pytriton with a copy of os.environ,
    so setting it in-process before the start is enough; no re-exec needed. True when changed.
    """
    env = os.environ if env is None else env
    libdir = python_lib_dir()
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir in parts:
        return False
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    return True


def check_port_free(host: str, port: int, what: str = "--port") -> None:
    """BadInputError when something already listens on host:port."""
    if not 0 < port < 65536:
        raise BadInputError(f"{what} {port} is not a TCP port", f"use {what} 8000")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except PermissionError:
            raise BadInputError(f"no permission to listen on {host}:{port}",
                                f"use a port above 1023, e.g. {what} 8000") from None
        except OSError as e:
            if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                raise BadInputError(f"port {port} on {host} is already in use (another server?)",
                                    f"stop that server or pick a free port, e.g. {what} {port + 10}"
                                    ) from None
            raise BadInputError(f"cannot listen on {host}:{port} ({e.strerror})",
                                "check --host (e.g. 127.0.0.1)") from None


def _numpy_dtype(pb2, data_type: int):
    name = pb2.DataType.Name(data_type)
    if name not in TRITON_TO_NUMPY:
        raise BadInputError(f"data type {name} is not served by the local launcher", "use TYPE_FP32")
    return TRITON_TO_NUMPY[name]


class _OrtModel:
    """One ONNX Runtime session per Triton instance, running the outputs the config declares."""

    def __init__(self, rm: RepoModel, threads: int | None):
        from idle_export.onnx.passes import session_options
        from idle_export.runtime.runners import import_onnxruntime, load_onnx

        ort = import_onnxruntime()
        proto = load_onnx(rm.model_file)
        opts = session_options(ort, threads=threads)
        self.session = ort.InferenceSession(proto.SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        have_in = {i.name for i in self.session.get_inputs()}
        have_out = {o.name for o in self.session.get_outputs()}
        self.inputs = [t.name for t in rm.config.input]
        self.outputs = [t.name for t in rm.config.output]
        pb2 = model_config_pb2()
        # ORT returns int64 as numpy 'q' (longlong), which pytriton's strict check rejects as int64
        self.dtypes = [_numpy_dtype(pb2, t.data_type) for t in rm.config.output]
        missing = [n for n in self.inputs if n not in have_in]
        missing += [n for n in self.outputs if n not in have_out]
        if missing:
            raise BadInputError(f"{rm.model_file} has no tensor {', '.join(missing)} named in "
                                f"{rm.name}/config.pbtxt",
                                "rewrite the repository with `idle-export serve repo`")
        self.lock = threading.Lock()

    def __call__(self, **inputs):
        with self.lock:
            values = self.session.run(self.outputs, {k: inputs[k] for k in self.inputs})
        return {name: _as_dtype(v, dt) for name, v, dt in zip(self.outputs, values, self.dtypes, strict=True)}


def _as_dtype(value: np.ndarray, dtype) -> np.ndarray:
    value = np.asarray(value)
    want = np.dtype(dtype)
    if value.dtype == want and value.dtype.char != want.char:  # same layout, other name ('q' vs 'l')
        return value.view(want)
    return value.astype(want, copy=False)


@dataclass
class ServerHandle:
    url: str
    models: list[str]
    log_file: str | None


def serve_repository(repo: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                     models: list[str] | None = None, threads: int | None = None,
                     grpc_port: int | None = None, metrics_port: int | None = None,
                     exit_timeout_s: int = 10, log_file: str | Path | None = None,
                     stop_event: threading.Event | None = None,
                     on_ready: Callable[[ServerHandle], None] | None = None,
                     handle_signals: bool = True) -> dict:
    """Serve the ONNX models of a repository with pytriton until SIGINT/SIGTERM (or stop_event).

    Each model is bound with the config's max_batch_size, dynamic batching (preferred sizes,
    queue delay), instance count and parameters; inference runs in this process with ONNX Runtime.
    Returns a summary dict once the server has stopped.
    """
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise MissingDependencyError("nvidia-pytriton is not installed", SERVE_PIP) from None
    pb2 = model_config_pb2()
    if pb2 is None:
        raise MissingDependencyError("tritonclient is not installed", SERVE_PIP)
    all_models = read_repository(repo, models)
    served = [m for m in all_models if m.platform == ONNX_PLATFORM]
    skipped = [m.name for m in all_models if m.platform != ONNX_PLATFORM]
    if not served:
        raise MissingDependencyError(
            f"{', '.join(skipped)}: platform {all_models[0].platform} needs a Triton server with that "
            "backend (a TensorRT plan needs an NVIDIA GPU)",
            "serve the repository with the stock Triton container (README: Serving), "
            "or write an ONNX repo")
    for p, what in ((port, "--port"), (grpc_port, "--grpc-port"), (metrics_port, "--metrics-port")):
        if p is not None:
            check_port_free(host, p, what)
    if threads is not None and threads < 1:
        raise BadInputError(f"--threads {threads} must be at least 1", "pass --threads 2")
    runtimes = {m.name: [_OrtModel(m, threads) for _ in range(_instance_count(m.config))] for m in served}

    fix_library_path()
    import logging

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    logging.getLogger("pytriton").setLevel(logging.WARNING)
    own_log = log_file is None
    if own_log:
        fd, log_file = tempfile.mkstemp(prefix="idle-export-triton-", suffix=".log")
        os.close(fd)
    config = TritonConfig(http_address=host, http_port=port, grpc_address=host,
                          allow_grpc=grpc_port is not None, grpc_port=grpc_port,
                          allow_metrics=metrics_port is not None, metrics_port=metrics_port,
                          metrics_address=host if metrics_port is not None else None,
                          exit_timeout_secs=exit_timeout_s, log_file=Path(log_file), log_verbose=0)
    security = TritonSecurityConfig(restricted_endpoints=RESTRICTED_ENDPOINTS)
    triton = Triton(config=config, security_config=security)

    stop = stop_event or threading.Event()
    received: list[str] = []
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            received.append(signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    url = f"http://{host}:{port}"
    started = time.perf_counter()
    try:
        for m in served:
            funcs = [batch(rt) for rt in runtimes[m.name]]
            inputs = [Tensor(name=t.name, dtype=_numpy_dtype(pb2, t.data_type), shape=tuple(t.dims))
                      for t in m.config.input]
            outputs = [Tensor(name=t.name, dtype=_numpy_dtype(pb2, t.data_type), shape=tuple(t.dims))
                       for t in m.config.output]
            db = m.config.dynamic_batching
            batcher = DynamicBatcher(preferred_batch_size=list(db.preferred_batch_size) or None,
                                     max_queue_delay_microseconds=db.max_queue_delay_microseconds)
            mc = ModelConfig(max_batch_size=max(1, m.config.max_batch_size), batcher=batcher)
            triton.bind(model_name=m.name, infer_func=funcs if len(funcs) > 1 else funcs[0],
                        inputs=inputs, outputs=outputs, config=mc, model_version=m.version, strict=True)
            _add_parameters(triton, m)
        try:
            triton.run()
        except Exception as e:  # noqa: BLE001 - pytriton raises plain exceptions
            raise IdleExportError(f"Triton did not start ({type(e).__name__}: {str(e)[:200]})",
                                  f"see the server log {log_file}; {_log_tail(log_file)}") from None
        if on_ready:
            on_ready(ServerHandle(url, [m.name for m in served], None if own_log else str(log_file)))
        while not stop.wait(0.5):
            if not triton.is_alive():
                raise IdleExportError("Triton stopped unexpectedly", f"{_log_tail(log_file)}")
    finally:
        triton.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_log and not sys.exc_info()[0]:
            Path(log_file).unlink(missing_ok=True)
    return {"url": url, "models": [m.name for m in served], "skipped": skipped,
            "uptime_s": round(time.perf_counter() - started, 2), "signal": received[0] if received else None}


def _instance_count(cfg) -> int:
    return max(1, sum(g.count for g in cfg.instance_group) or 1)


def _add_parameters(triton, rm: RepoModel) -> None:
    """Show the repository's config parameters (idle_export.* metadata) in the served config.

    pytriton 0.7 has no public field for model parameters; its generated config is extended
    through the model's TritonModelConfig (checked by tests/test_serve.py)."""
    params = {k: v.string_value for k, v in rm.config.parameters.items()}
    if not params:
        return
    try:
        model = next(m for m in triton._model_manager.models if m.model_name == rm.name)
        model._get_triton_model_config().backend_parameters.update(params)
    except Exception:  # noqa: BLE001 - a private API; serving still works without the metadata
        import warnings

        warnings.warn("could not pass the idle_export.* parameters to pytriton; `serve query` will fall "
                      "back to DeiT preprocessing defaults", stacklevel=2)


def _log_tail(log_file, lines: int = 3) -> str:
    try:
        text = Path(log_file).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    errors = [ln for ln in text if ln.startswith("E")] or text
    return " | ".join(errors[-lines:])[:400]


# ============================================================================ client
def _client(url: str, timeout_s: float):
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise MissingDependencyError("tritonclient[http] is not installed", SERVE_PIP) from None
    text = url.strip()
    ssl = text.startswith("https://")
    hostport = re.sub(r"^https?://", "", text).rstrip("/")
    if not hostport or "/" in hostport:
        raise BadInputError(f"URL {url!r} is not a server address", "e.g. http://127.0.0.1:8000")
    return httpclient.InferenceServerClient(hostport, ssl=ssl, connection_timeout=timeout_s,
                                            network_timeout=timeout_s)


def _server_error(e) -> str:
    msg = getattr(e, "message", None)
    msg = msg() if callable(msg) else (msg or str(e))
    return " ".join(str(msg).split())[:300]


def load_images(paths: list[str | Path]):
    """PIL RGB images, decoded the way `check --images` and `calibrate` decode them
    (calibration.data.open_rgb: 16/32-bit grayscale scaled, not clipped); one-line errors for
    missing files and bytes that are not an image."""
    from PIL import UnidentifiedImageError

    from idle_export.data.images import open_rgb

    images = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise BadInputError(f"image not found: {p}", "check the path")
        try:
            images.append(open_rgb(p)[0])
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise BadInputError(f"{p.name} is not an image this tool can read ({type(e).__name__})",
                                "pass a JPEG, PNG, WebP, BMP or TIFF file") from None
    return images


def _spec_from_parameters(params: dict[str, str], dims: list[int]):
    """ModelSpec from the served idle_export.* parameters, else DeiT defaults for the input size."""
    from types import SimpleNamespace

    from idle_export.model.config import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

    try:
        return ModelSpec.from_metadata(params), None
    except (BadInputError, ValueError, TypeError, KeyError):
        size = int(dims[-1]) if dims else 224
        return (SimpleNamespace(img_size=size, crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_MEAN,
                                std=IMAGENET_STD),
                "the served model has no idle-export metadata: DeiT preprocessing assumed "
                "(bicubic, crop 0.875, ImageNet mean/std)")


def query(url: str, images: list[str | Path], *, model: str | None = None, top: int = 5, repeat: int = 1,
          timeout_s: float = 60.0) -> dict:
    """Top-k classes of each image and request latency from a Triton server (KServe v2 HTTP)."""
    from tritonclient.utils import InferenceServerException

    from idle_export.data.inputs import eval_transform

    if top < 1:
        raise BadInputError(f"--top {top} must be at least 1", "e.g. --top 5")
    if repeat < 1:
        raise BadInputError(f"--repeat {repeat} must be at least 1", "e.g. --repeat 20")
    if not images:
        raise BadInputError("no image given", "pass one or more image files")
    pil = load_images(images)
    client = _client(url, timeout_s)
    try:
        try:
            live = client.is_server_live()
        except InferenceServerException as e:
            live, why = False, _server_error(e)
        except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts
            live, why = False, f"{type(e).__name__}"
        else:
            why = "not live"
        if not live:
            raise BadInputError(f"no Triton server answers at {url} ({why})",
                                "start one with `idle-export serve run model_repository/ --port 8000`")
        name = model or _only_model(client, url)
        try:
            cfg = client.get_model_config(name)
        except InferenceServerException as e:
            raise BadInputError(f"model {name!r}: {_server_error(e)}", "check --model") from None
        inp, out = cfg["input"][0], cfg["output"][0]
        if inp.get("data_type") != "TYPE_FP32":
            raise BadInputError(f"model {name} takes {inp.get('data_type')}, not an FP32 image",
                                "query a model written by `idle-export serve repo`")
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        spec, warning = _spec_from_parameters(params, inp.get("dims", []))
        classes = None
        if "idle_export.classes" in params:
            _, classes = _metadata_values({"idle_export.classes": params["idle_export.classes"]})
        transform = eval_transform(spec)
        x = np.stack([transform(img).numpy() for img in pil]).astype(np.float32)
        max_batch = int(cfg.get("max_batch_size", 0)) or len(pil)
        latencies, logits = [], None
        import tritonclient.http as httpclient

        for _ in range(repeat):
            chunks = []
            for start in range(0, len(x), max_batch):
                part = x[start:start + max_batch]
                tensor = httpclient.InferInput(inp["name"], list(part.shape), "FP32")
                tensor.set_data_from_numpy(part)
                t0 = time.perf_counter()
                try:
                    res = client.infer(name, [tensor], outputs=[httpclient.InferRequestedOutput(out["name"])])
                except InferenceServerException as e:
                    raise BadInputError(f"the server refused the request: {_server_error(e)}",
                                        "check the model's input shape") from None
                latencies.append((time.perf_counter() - t0) * 1e3)
                chunks.append(res.as_numpy(out["name"]))
            logits = np.concatenate(chunks)
    finally:
        client.close()
    return {"url": url, "model": name, "images": [str(p) for p in images],
            "results": topk_report(logits, classes, top, [str(p) for p in images]),
            "latency_ms": _latency(latencies), "requests": len(latencies),
            "warnings": [warning] if warning else []}


def _only_model(client, url: str) -> str:
    """The one model the server has ready: from the repository index (a stock Triton), else from
    the statistics of loaded models (pytriton loads models from outside its repository)."""
    from tritonclient.utils import InferenceServerException

    names: list[str] = []
    errors = []
    try:
        names = [m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"]
    except InferenceServerException as e:
        errors.append(_server_error(e))
    if not names:
        try:
            names = [m["name"] for m in client.get_inference_statistics().get("model_stats", [])]
        except InferenceServerException as e:
            errors.append(_server_error(e))
    names = sorted(set(names))
    if len(names) != 1:
        why = f" ({'; '.join(errors)})" if errors else ""
        raise BadInputError(f"{len(names)} models ready at {url}: {', '.join(names) or '(none)'}{why}",
                            "pass --model NAME")
    return names[0]


def topk_report(logits: np.ndarray, classes: list[str] | None, top: int, names: list[str]) -> list[dict]:
    logits = np.asarray(logits, dtype=np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(top, logits.shape[1])
    rows = []
    for i, name in enumerate(names):
        order = np.argsort(-logits[i], kind="stable")[:k]
        rows.append({"image": name, "top": [
            {"index": int(c), "label": classes[c] if classes and c < len(classes) else None,
             "logit": float(logits[i, c]), "prob": float(prob[i, c])} for c in order]})
    return rows


def _latency(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max())}
