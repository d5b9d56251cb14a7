"""A Triton model repository: `write_repository(model, out)` writes `out/NAME/config.pbtxt`,
`out/NAME/<version>/model.onnx` (or `model.plan` for an engine with its sidecar), `labels.txt` when
the model knows its classes and `idle_export.json`, built in a temporary folder and renamed into
place; `read_repository` reads one back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from idle_export import __version__
from idle_export.errors import BadInputError
from idle_export.fileio import (
    atomic_write_text,
    check_free_space,
    clean_stale,
    copy_hashing,
    disk_full,
    folder_lock,
    is_disk_full,
    mapped_disk_full,
    mkdir_hint,
    sha256_file,
    temp_name,
)
from idle_export.onnx.io import MAX_BATCH, load_onnx_header
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.serve.config import (
    _ONNX_TO_TRITON,
    CONFIG_NAME,
    DEFAULT_FILENAMES,
    KINDS,
    LABELS_NAME,
    NAME_RE,
    ONNX_PLATFORM,
    PLAN_PLATFORM,
    PLAN_SUFFIXES,
    SIDECAR_NAME,
    RepoConfig,
    TensorConfig,
    accelerator_parameters,
    accelerator_warnings,
    int8_cpu_warnings,
    model_config_pb2,
    parse_config,
    plain_parameters,
    render_config,
    sanitize_name,
    validate_config,
)
from idle_export.serve.elastic import serve_elastic
from idle_export.trt.sidecar import inspect_engine


def _onnx_io(path: Path):
    """(inputs, outputs, metadata, external data files) of an ONNX file, weights not loaded."""
    import onnx

    proto = load_onnx_header(path)
    if not proto.graph.node:  # an empty file parses as an empty model
        raise BadInputError(f"{path.name} is not an ONNX model (no graph)",
                            "pass a file written by `idle-export onnx`")
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
    meta = OnnxMetadata.of(proto)
    external = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is None or Path(loc).is_absolute() or ".." in Path(loc).parts:
                raise BadInputError(f"{path.name} stores weights at {loc!r}, outside its folder",
                                    "re-save it with onnx.save_model(..., location='model.onnx.data')")
            external.add(loc)
    return inputs, outputs, meta, sorted(external)


def write_repository(model: str | Path, output: str | Path, **kwargs) -> dict:
    """Write `output/NAME/` for an ONNX file or a TensorRT engine (see _write_repository). One
    writer at a time per repository (a lock on its folder: a second run waits, then sees the
    first's model); a folder this call created is removed again when it fails."""
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    if output.exists() and not output.is_dir():
        raise BadInputError(f"output {output} is a file", "give a folder for the model repository")
    if not output.exists() and parent.exists() and not parent.is_dir():
        raise BadInputError(f"{parent} is a file, not a folder", "give output= a path inside a folder")
    if not output.exists() and not parent.is_dir():
        raise BadInputError(f"folder {parent} does not exist", mkdir_hint(parent))
    created = not output.exists()
    try:
        output.mkdir(exist_ok=True)
    except OSError as e:
        raise (disk_full(output) if is_disk_full(e) else
               BadInputError(f"cannot create {output}", "choose a writable output=")) from None
    try:
        clean_stale(output)
        with folder_lock(output), mapped_disk_full(output):
            return _write_repository(model, output, **kwargs)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                output.rmdir()  # only when empty: another writer's model stays
        raise


def _write_repository(model: str | Path, output: Path, *, name: str | None = None,
                     max_batch: int | None = 64, preferred: list[int] | None = None,
                     queue_delay_us: int = 100, instances: int = 1, kind: str | None = None,
                     version: int = 1, onnx: str | Path | None = None,
                     force: bool = False, accelerator: str | None = None,
                     accelerator_precision: str = "fp16") -> dict:
    """Write `output/NAME/` for an ONNX file or a TensorRT engine (+ the ENGINE.json sidecar that
    `idle-export trt` writes, read and checked by trt.sidecar.inspect_engine).

    For an engine, tensor names/shapes and metadata come from the ONNX it was built from
    (`onnx=`, or the sidecar's onnx path, beside the engine, when that file exists). A model
    folder that exists already gets `version` beside its other versions (Triton's versioning;
    the inputs and outputs must match theirs); `force` replaces that one version.
    `accelerator="tensorrt"` (ONNX only): Triton's ONNX Runtime backend builds a TensorRT engine
    on the serving GPU (`accelerator_precision` fp16|fp32); "openvino": OpenVINO on the CPU.
    Returns a report dict.
    """
    model = Path(model)
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
                            "use letters, digits, '.', '_' and '-' only, not starting with '.' (name=)")
    if version < 1:
        raise BadInputError(f"version={version} must be at least 1", "use version=1")
    if instances < 1:
        raise BadInputError(f"instances={instances} must be at least 1", "use instances=1")
    if queue_delay_us < 0:
        raise BadInputError(f"queue_delay_us={queue_delay_us} is negative", "use e.g. queue_delay_us=100")
    kind = kind or ("gpu" if is_plan else "auto")
    if kind not in KINDS:
        raise BadInputError(f"kind={kind!r} is not one of {', '.join(KINDS)}", "use kind=auto")
    if is_plan and kind == "cpu":
        raise BadInputError("a TensorRT plan cannot run on CPU instances", "use kind=gpu")
    final = output / name
    if final.exists() and not (final / CONFIG_NAME).is_file():
        raise BadInputError(f"{final} exists and is not a model folder (no {CONFIG_NAME})",
                            "choose another name= or output=")
    taken = sorted(int(p.name) for p in final.iterdir() if p.is_dir() and p.name.isdigit()) \
        if final.is_dir() else []
    if version in taken and not force:
        raise BadInputError(f"{final} already has version {version}",
                            f"add a new version with version={max(taken) + 1}, or replace this one "
                            "with force=True")
    accel_params = accelerator_parameters(accelerator, accelerator_precision, is_plan, kind)

    warnings: list[str] = []
    engine_info: dict = {}
    profile = None
    external: list[str] = []
    if is_plan:
        ins, outs, meta, profile, engine_info = _engine_io(model, onnx, warnings)
    else:
        ins, outs, meta, external = _onnx_io(model)
        warnings += accelerator_warnings(meta, accelerator, model.name)
        warnings += int8_cpu_warnings(meta, accelerator, kind, model.name)

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
    max_batch, preferred = _batching(max_batch, preferred, profile)

    params, classes = plain_parameters(meta), meta.classes
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
                     comment=f"written by idle-export {__version__}", accelerator=accelerator,
                     accelerator_parameters=accel_params)
    if serve_elastic(cfg, meta, engine_info, warnings):  # keep_rate per request, never batched together
        max_batch, preferred, queue_delay_us = 0, [], 0
    if taken:
        _check_same_io(final, cfg, version)
    text = render_config(cfg)
    validated = validate_config(text, cfg)
    if not validated:
        warnings.append("config.pbtxt not parsed back: tritonclient is not installed")

    copied = _install(model, output, name, version, platform, text, classes, meta, engine_info,
                      external)
    return {
        "repository": str(output), "name": name, "folder": str(final), "platform": platform,
        "version": version, "max_batch_size": max_batch, "preferred_batch_sizes": preferred,
        "max_queue_delay_us": queue_delay_us, "instance_group": {"count": instances, "kind": KINDS[kind]},
        "inputs": [vars(t) for t in cfg.inputs], "outputs": [vars(t) for t in cfg.outputs],
        "files": [CONFIG_NAME, *([LABELS_NAME] if classes is not None else []), *copied],
        "versions": sorted({*taken, version}), "accelerator": accelerator,
        "labels": len(classes) if classes else 0, "validated_with_triton_protobuf": validated,
        "warnings": warnings,
    }


def _engine_io(model: Path, onnx, warnings: list[str]):
    """Inputs, outputs and metadata of an engine (from the ONNX it was built from, checked by
    sha256), its batch profile (min, opt, max) and its sidecar."""
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
                            "pass onnx=MODEL.onnx, the ONNX file the engine was built from")
    ins, outs, meta, _ = _onnx_io(onnx)
    if source.get("sha256") and source["sha256"] != sha256_file(onnx):
        raise BadInputError(f"{model.name} was not built from {onnx.name} (ONNX sha256 differs)",
                            "pass the ONNX file the engine was built from with onnx=")
    first = (side.get("profiles") or [None])[0]  # batch = dim 0 of min/opt/max
    profile = tuple(first[k][0] for k in ("min", "opt", "max")) if first else None
    if profile is None:
        warnings.append("the engine sidecar has no optimisation profile: trusting the max batch given")
    return ins, outs, meta, profile, {k: v for k, v in side.items() if k != "checks"}


def _batching(max_batch: int | None, preferred: list[int] | None, profile) -> tuple[int, list[int]]:
    """max_batch_size and the dynamic batcher's preferred sizes, checked against the engine's
    profile when there is one."""
    if max_batch is None:
        max_batch = profile[2] if profile else 64
    if not 1 <= max_batch <= MAX_BATCH:
        raise BadInputError(f"max_batch={max_batch} must be between 1 and {MAX_BATCH} (the largest batch "
                            "an exported graph takes)", "e.g. max_batch=64")
    if profile:
        pmin, popt, pmax = profile
        if pmin > 1:
            raise BadInputError(f"the engine's profile starts at batch {pmin}; Triton sends batches of 1 "
                                "and up", "rebuild the engine with `idle-export trt --profile 1:OPT:MAX`")
        if max_batch > pmax:
            raise BadInputError(f"max_batch={max_batch} is above the engine's profile maximum {pmax}",
                                f"use max_batch={pmax} or rebuild the engine for a larger batch")
    if preferred is None:
        opt = profile[1] if profile else max(1, max_batch // 2)
        preferred = sorted({min(opt, max_batch), max_batch})
    preferred = sorted(set(preferred))
    if not preferred or preferred[0] < 1 or preferred[-1] > max_batch:
        raise BadInputError(f"preferred={','.join(map(str, preferred))} must lie in 1..{max_batch}",
                            f"e.g. preferred={max(1, max_batch // 2)},{max_batch}")
    return max_batch, preferred


def _install(model: Path, output: Path, name: str, version: int, platform: str, text: str,
             classes: list[str] | None, meta: OnnxMetadata, engine_info: dict,
             external: list[str]) -> list[str]:
    """Build the version folder in a temporary folder inside the repository and rename it into
    place; a new model folder is built whole and renamed the same way. config.pbtxt and
    labels.txt are replaced atomically. Returns the files of the version folder."""
    if not os.access(output, os.W_OK | os.X_OK):
        raise BadInputError(f"model repository {output} is not writable", "choose another output=")
    final = output / name
    new_model = not final.exists()
    sizes = [model] + [model.parent / loc for loc in external if (model.parent / loc).is_file()]
    check_free_space(output, sum(p.stat().st_size for p in sizes), final)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(name), dir=output))
    old = None
    try:
        vdir = tmp / str(version)
        vdir.mkdir()
        model_file = vdir / DEFAULT_FILENAMES[platform]
        sha256 = copy_hashing(model, model_file)  # the model read once: copied and hashed
        copied = [model_file.name]
        if platform == PLAN_PLATFORM:
            (vdir / (model_file.name + ".json")).write_text(json.dumps(engine_info, indent=2) + "\n")
            copied.append(f"{model_file.name}.json")
        for loc in external:
            src = model.parent / loc
            if not src.is_file():
                raise BadInputError(f"{model.name} refers to external weights {loc} that are missing",
                                    f"keep {loc} next to {model.name}")
            (vdir / loc).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, vdir / loc)
            copied.append(loc)
        side = {"tool": f"idle-export {__version__}", "source": model.name, "platform": platform,
                "sha256": sha256, "version": version,
                "metadata": {k: _json_or_text(v) for k, v in meta.ours().items()}}
        if engine_info:
            side["engine"] = engine_info
        (vdir / SIDECAR_NAME).write_text(json.dumps(side, indent=2) + "\n")
        copied.append(SIDECAR_NAME)
        if new_model:
            (tmp / CONFIG_NAME).write_text(text)
            if classes is not None:
                (tmp / LABELS_NAME).write_text(_labels(classes))
            os.replace(tmp, final)
        else:
            if (final / str(version)).exists():  # --force: this version only
                old = output / f"{temp_name(name)}{version}.old"
                os.replace(final / str(version), old)
            os.replace(vdir, final / str(version))
            atomic_write_text(final / CONFIG_NAME, text)
            if classes is not None:
                atomic_write_text(final / LABELS_NAME, _labels(classes))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return [f"{version}/{f}" for f in copied]


def _labels(classes: list[str]) -> str:
    return "".join(c.replace("\n", " ") + "\n" for c in classes)


def _check_same_io(final: Path, cfg: RepoConfig, version: int) -> None:
    """One config.pbtxt serves every version: a new version must have the same platform, inputs
    and outputs as the model folder's."""
    have = parse_config((final / CONFIG_NAME).read_text(errors="replace"), str(final / CONFIG_NAME))
    pb2 = model_config_pb2()
    if pb2 is None:
        return

    def io(tensors):
        return [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors]

    old_io = (have.platform or have.backend, io(have.input), io(have.output))
    new_io = (cfg.platform, [(t.name, t.data_type, t.dims) for t in cfg.inputs],
              [(t.name, t.data_type, t.dims) for t in cfg.outputs])
    if old_io != new_io:
        raise BadInputError(f"version {version} would have other inputs, outputs or platform than the "
                            f"versions in {final.name} (one config.pbtxt serves them all)",
                            "write it as another model: name=NEW_NAME")


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value
