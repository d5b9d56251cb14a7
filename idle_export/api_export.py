"""The export half of the public API (`idle_export.api` re-exports every name): checkpoints,
model specs, ONNX export, the OpenVINO IR and TensorRT engines. Errors name the parameters as
these functions spell them (`scores=`, `plugin=True`); the CLI prints its flags instead."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from idle_export.errors import BadInputError
from idle_export.fileio import check_output_path, is_stream
from idle_export.model import build  # light: it imports the family's torch module when called
from idle_export.model.checkpoint import Checkpoint
from idle_export.model.checkpoint import load_checkpoint as _load_checkpoint
from idle_export.model.config import SCORE_MODES, ModelSpec
from idle_export.model.families import family_of
from idle_export.onnx.discover import pick_idle_onnx
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.io import DEFAULT_OPSET, check_opset, load_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.targets import check_target
from idle_export.quantize.qdq import default_int8_path, quantize_onnx
from idle_export.quantize.selection import is_quantized
from idle_export.runtime.openvino_ir import ir_skipped, write_ir
from idle_export.trt.build import build_engine as _build_engine
from idle_export.trt.inputs import default_engine_path, parse_keep_range, parse_profile

if TYPE_CHECKING:
    import torch

PathLike = str | Path
CheckpointLike = str | Path | Checkpoint
PRECISIONS = ("fp32", "fp16", "int8")


def _no_progress(message: str):
    return contextlib.nullcontext()


def load_checkpoint(path: PathLike, *, ema: bool = False) -> Checkpoint:
    """Read a checkpoint safely (`torch.load(weights_only=True)` or safetensors).

    Every form IdleViT users have is accepted: the official training checkpoint, `{'model': sd}`,
    `{'state_dict': sd}`, a bare state dict or a `.safetensors` file. `ema=True` takes the
    `model_ema` weights. The result carries the weights, the training args (`arch`, `base_rate`)
    and the file's sha256; `model_spec` turns it into the model to export.
    """
    return _load_checkpoint(path, ema=ema)


def _checkpoint(checkpoint: CheckpointLike, ema: bool) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else _load_checkpoint(checkpoint, ema=ema)


def model_spec(checkpoint: CheckpointLike, *, arch: str | None = None, keep: float | None = None,
               schedule: str = "eval", idle_layers: Sequence[int] | None = None,
               keep_k: Sequence[int] | None = None, ema: bool = False,
               family: str | None = None) -> ModelSpec:
    """The ModelSpec (architecture, idle layers, K per idle layer) of a checkpoint.

    `arch` and `keep` default to the checkpoint's `args.arch` / `args.base_rate`; `schedule` is
    "eval" (idle layers 3..11, the official evaluation script) or "train" (4..11); `idle_layers`
    and `keep_k` set the layers and the kept tokens per layer explicitly, as the CLI's
    `--idle-layers` and `--keep-k` do. `family` ("idlevit", "evit", "dynamicvit") reads the
    checkpoint as that family, as `--family` does; by default its keys and args tell.
    """
    ckpt = _checkpoint(checkpoint, ema)
    return ckpt.spec(arch=arch, keep_rate=keep, schedule=schedule, method=family,
                     idle_layers=list(idle_layers) if idle_layers is not None else None,
                     keep_k=list(keep_k) if keep_k is not None else None)


def torch_model(checkpoint: CheckpointLike, *, dense: bool = False, scores: str = "official",
                spec: ModelSpec | None = None, ema: bool = False) -> torch.nn.Module:
    """The IdleViT (eval mode, on the CPU) that the export starts from, with the checkpoint's
    weights: `model(images)` gives the logits. `dense=True` gives the dense baseline (every token
    in every layer); `scores` is "official" (the paper's keys for every token) or "folded".
    `spec` defaults to `model_spec(checkpoint)`."""
    ckpt = _checkpoint(checkpoint, ema)
    _check_scores(scores)
    return build.build_model(spec or ckpt.spec(), ckpt.state_dict, dense=dense, score_mode=scores)


def _check_scores(scores: str | None) -> None:
    if scores is not None and scores not in SCORE_MODES:
        raise BadInputError(f"scores={scores!r} is not one of {', '.join(SCORE_MODES)}",
                            "use scores=folded (the default export) or scores=official")


def default_onnx_path(checkpoint: PathLike, *, dense: bool = False, plugin: bool = False,
                      elastic: bool = False, target: str = "portable") -> Path:
    """Where `export_onnx` writes without an output: CHECKPOINT_idle.onnx beside the checkpoint
    (_dense, _idle_plugin, _idle_elastic; a target other than portable adds .TARGET)."""
    checkpoint = Path(checkpoint)
    kind = "dense" if dense else "idle_plugin" if plugin else "idle_elastic" if elastic else "idle"
    suffix = "" if target == "portable" else f".{target}"
    return checkpoint.with_name(f"{checkpoint.stem}_{kind}{suffix}.onnx")


def export_onnx(checkpoint: CheckpointLike, output: PathLike | None = None, *, dense: bool = False,
                arch: str | None = None, keep: float | None = None, schedule: str = "eval",
                idle_layers: Sequence[int] | None = None, keep_k: Sequence[int] | None = None,
                spec: ModelSpec | None = None, ema: bool = False, scores: str | None = None,
                emit_selection: bool = False, plugin: bool = False, opset: int = DEFAULT_OPSET,
                external_data: bool = False, target: str = "portable", elastic: bool = False,
                openvino_ir: bool = True, family: str | None = None, allow_nonfinite: bool = False,
                progress=None) -> Path:
    """Export a checkpoint to ONNX (`idle-export onnx`); returns the path written.

    The idle graph (TopK + GatherElements + ScatterElements, dynamic batch) by default, the
    dense baseline of the same weights with `dense=True`. The model is `spec` if given, else
    `model_spec(checkpoint, arch=..., keep=..., schedule=..., idle_layers=..., keep_k=...)`.
    `scores`: "folded" (the same top-K without keys for idle tokens; IdleViT's default) or
    "official" (EViT's and DynamicViT's only one); `family` as in `model_spec`;
    `emit_selection` adds each idle layer's kept token indices as outputs; `plugin` writes the
    plugin form (fused idle-select kernels); `external_data` puts the weights in OUTPUT.data.
    `target`: where the file runs, its graph passes written into it: "portable" (none, the
    default), "ort" (+ com.microsoft.BiasGelu), "openvino" or "tensorrt" (onnx.targets).
    `elastic`: one file for every keep rate, K computed in the graph from an optional input
    keep_rate (default the spec's rate; docs/export.md#elastic-keep-rate).
    `openvino_ir`: with target "openvino", also write OUTPUT.xml + OUTPUT.bin (`write_openvino_ir`).
    `allow_nonfinite`: export weights with NaN or inf values (refused otherwise).
    `output` defaults to `default_onnx_path(checkpoint, ...)`, beside the checkpoint.
    `progress(message)`: a context manager shown around each step (loading, exporting).
    The file is written atomically, with the metadata that `check`, `bench` and `trt` read.
    """
    _check_scores(scores)
    check_target(target)
    check_opset(opset)
    if output is None:
        where = checkpoint.path if isinstance(checkpoint, Checkpoint) else checkpoint
        output = default_onnx_path(where, dense=dense, plugin=plugin, elastic=elastic, target=target)
    output = check_output_path(Path(output), "output=", stream_ok=not external_data)
    step = progress or _no_progress
    name = checkpoint.path.name if isinstance(checkpoint, Checkpoint) else Path(checkpoint).name
    with step(f"loading {name}"):
        ckpt = _checkpoint(checkpoint, ema)
        if spec is None:
            spec = model_spec(ckpt, arch=arch, keep=keep, schedule=schedule, idle_layers=idle_layers,
                              keep_k=keep_k, family=family)
    with step(f"exporting {spec.describe()}{' dense' if dense else ''} to {output}"):
        path = export_checkpoint(ckpt, spec, output, dense=dense, emit_selection=emit_selection,
                                 score_mode=scores, opset=opset, external_data=external_data,
                                 plugin=plugin, target=target, elastic=elastic,
                                 allow_nonfinite=allow_nonfinite)
    if target == "openvino" and openvino_ir:
        write_openvino_ir(path, progress=progress)
    return path


def write_openvino_ir(onnx: PathLike, *, progress=None) -> dict:
    """The OpenVINO IR of an ONNX file (`onnx --target openvino` writes it): ONNX.xml + ONNX.bin
    beside it, the token-score path marked to stay f32 where OpenVINO computes in bf16. Returns
    {"xml", "bin", "marked"} (paths and the number of marked ops), or {"skipped": why} for a file
    that gets none (dense, elastic, a stream, OpenVINO not installed)."""
    path = Path(onnx)
    meta = None if is_stream(path) else OnnxMetadata.read(path)
    why = ir_skipped(path, dense=bool(meta and meta.dense), elastic=bool(meta and meta.elastic))
    if why:
        return {"skipped": why}
    with (progress or _no_progress)(f"writing the OpenVINO IR of {path.name}"):
        xml, binary, marked = write_ir(path)
    return {"xml": xml, "bin": binary, "marked": marked}


def _profile(batch, shapes, meta: OnnxMetadata) -> tuple[int, int, int]:
    if shapes is not None:
        if len(shapes) != 3 or not all(shapes):
            raise BadInputError("shapes= takes the min, opt and max shapes together",
                                "e.g. shapes=('images:1x3x224x224', 'images:32x3x224x224', "
                                "'images:64x3x224x224')")
        size = meta.spec.img_size if meta.has_spec else None
        return parse_profile(None, shapes=tuple(shapes), chw=(3, size, size) if size else None)
    return parse_profile(batch if isinstance(batch, str) else ":".join(str(int(b)) for b in batch))


def build_engine(onnx: PathLike | None = None, output: PathLike | None = None, *, precision: str = "fp16",
                 batch: tuple[int, int, int] | str = (1, 32, 64), shapes: Sequence[str] | None = None,
                 target: str | None = None, flavour: str | None = None, timing_cache: PathLike | None = None,
                 workspace: int | None = None, selection: bool = False, plugin: bool = False,
                 verbose: bool = False, elastic: bool | None = None,
                 keep_range: tuple[float, float, float] | str | None = None,
                 calib: PathLike | None = None, calib_num: int | None = None,
                 progress=None, echo=None) -> dict:
    """Build a TensorRT engine and its ENGINE.json sidecar (`idle-export trt`); needs the `trt`
    extra (TensorRT-RTX, which builds without a GPU) or TensorRT 10/11 on an NVIDIA GPU.

    `onnx` defaults to the one idle export in the current folder. `precision`: "fp32", "fp16"
    (token scores, TopK and indices stay FP32/INT64) or "int8": a Q/DQ ONNX from
    `quantize(..., target="trt")`, or an FP32 file, calibrated first for TensorRT into
    ONNX_STEM.int8.trt.onnx beside the engine (on `calib`, a folder of images, default the
    built-in photos; `calib_num` of them). `batch`: the profile (min, opt, max) or "MIN:OPT:MAX";
    `shapes`: trtexec-style (min, opt, max) shapes such as "images:32x3x224x224" instead.
    `target`: a compute capability to cross-build for with TensorRT-RTX ("sm89"); `flavour`:
    "tensorrt" or "tensorrt_rtx" (default: tensorrt when installed). `output` defaults to
    ONNX_STEM.PRECISION.engine. `elastic` (default: when `keep_range` is given): an elastic file
    built with its rate variable (`trt --elastic`; the int64 shape input keep_permille) over
    `keep_range` (min, opt, max rates, or "MIN:OPT:MAX"; default the file's smallest valid rate,
    its default rate, 1). `progress(message)`: a context manager around each step; `echo(line)`
    gets the builder's notes. Returns the sidecar dict (versions, profile, build time, the
    equivalent trtexec command line).
    """
    if precision not in PRECISIONS:
        raise BadInputError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}",
                            "use precision=fp16 (the default), precision=fp32 or precision=int8")
    if calib is not None and precision != "int8":
        raise BadInputError("calib= is for INT8 builds", "add precision=int8, or drop calib=")
    if calib_num is not None and calib_num < 1:
        raise BadInputError(f"calib_num={calib_num} must be at least 1", "e.g. calib_num=256")
    if calib is not None and not Path(calib).exists():
        raise BadInputError(f"calib={calib} does not exist", "pass a folder of calibration images")
    elastic = keep_range is not None if elastic is None else elastic
    if keep_range is not None and not elastic:
        raise BadInputError("keep_range= is the profile of an elastic engine", "add elastic=True")
    if elastic and plugin:
        raise BadInputError("elastic=True builds the standard form; plugin=True the plugin form",
                            "drop one of them")
    if onnx is None:
        onnx = pick_idle_onnx(Path("."), "trt")
        (echo or (lambda s: None))(f"trt: building from {Path(onnx).name} (the idle export in this folder)")
    onnx = Path(onnx)
    meta = OnnxMetadata.read(onnx)
    if meta.has_spec and (plugin or elastic):  # EViT, DynamicViT: neither form exists for them
        family_of(meta.spec.arch).refuse("plugin=True" if plugin else "elastic=True",
                                         "build the standard form: drop plugin=True / elastic=True")
    profile = _profile(batch, shapes, meta)
    if elastic:
        keep_profile = parse_keep_range(None if keep_range is None else keep_range if isinstance(
            keep_range, str) else ":".join(f"{float(r):g}" for r in keep_range), meta)
    else:
        keep_profile = None
    output = Path(output) if output is not None else default_engine_path(onnx, precision)
    step = progress or _no_progress
    source, calibrated = onnx, None
    if precision == "int8" and not plugin and not is_quantized(load_onnx(onnx)):
        calibrated = output.parent / default_int8_path(onnx, "trt").name
        where = calib or "the built-in photos"
        with step(f"calibrating {onnx.name} for TensorRT on {where}") as shown:
            report = quantize_onnx(onnx, calibrated, images=calib, num=calib_num, method="minmax",
                                   target="trt", status=getattr(shown, "update", None))
        (echo or (lambda s: None))(f"wrote {calibrated} (INT8 Q/DQ for TensorRT, {report['num_images']} "
                                   f"calibration images from {where})")
        source = calibrated
    try:
        with step(f"building {output.name} ({precision}, batch {':'.join(map(str, profile))})"):
            info = _build_engine(source, precision=precision, batch=profile, target=target,
                                 timing_cache=timing_cache, workspace=workspace, verbose=verbose,
                                 output=output, flavour=flavour, selection=selection, plugin=plugin,
                                 echo=echo, keep_range=keep_profile)
    except BaseException:
        if calibrated is not None:  # the INT8 graph calibrated for this build: nothing stays behind
            calibrated.unlink(missing_ok=True)
        raise
    return info
