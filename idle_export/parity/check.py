"""`idle-export check`: an ONNX file against torch (from the checkpoint) or another ONNX file, and
an engine against the ONNX it was built from; the verdict uses the candidate's precision."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from idle_export.data.images import load_images
from idle_export.data.inputs import input_set
from idle_export.errors import BadInputError
from idle_export.fileio import sha256_file
from idle_export.hardware import check_batch_fits
from idle_export.lazy import lazy_module
from idle_export.model.checkpoint import Checkpoint, load_checkpoint
from idle_export.model.config import TOLERANCES, Tolerances
from idle_export.numerics import describe_nonfinite
from idle_export.onnx.elastic import elastic_feed
from idle_export.onnx.io import load_onnx, nonfinite_initializers
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.parity.compare import compare_on_images, compare_runners, labels_from_folders
from idle_export.parity.saved import Recorder
from idle_export.parity.saved import load_outputs as load_outputs_file
from idle_export.parity.saved import save_outputs as save_outputs_file
from idle_export.runtime import registry
from idle_export.runtime.openvino_ir import is_ir, read_ir_metadata
from idle_export.trt.sidecar import inspect_engine

build = lazy_module("idle_export.model.build")  # torch


CHECK_PRECISIONS = ("f32", "bf16", "default")  # the runtime's inference precision (--precision)


def tolerance_for(meta: OnnxMetadata) -> Tolerances:
    """Tolerances for a candidate model from its precision metadata (fp32 when absent or unknown)."""
    try:
        precision = meta.precision
    except BadInputError:
        precision = "fp32"
    return TOLERANCES.get(precision, TOLERANCES["fp32"])


def check_onnx(onnx_path, *, ckpt_path=None, against=None, ema: bool = False,
               batch_sizes=(1, 7, 32), input_sets=("noise", "photos"), tol: Tolerances | None = None,
               seed: int = 0, threads: int | None = None, images=None, num: int = 0,
               max_abs: float | None = None, backend: str = "ort", keep_rate: float | None = None,
               save_outputs=None, load_outputs=None, precision: str = "f32") -> dict:
    """`idle-export check`: ONNX Runtime on `onnx_path` against torch (from the checkpoint: a
    path, or a Checkpoint already loaded) or against another ONNX file. Exported metadata tells
    which model and preprocessing to use.

    Tolerances: `tol` if given, else from the candidate's `idle_export.precision` (fp32, fp16,
    int8), with `max_abs` overriding the logit tolerance. `images` (a folder, .txt list or image
    file; see data.images) adds the input set "images": all of them (or `num`), each batch
    size running over the whole set; with an ImageFolder layout whose folder names are the
    model's classes, accuracy is reported too. `backend` runs the candidate: ort (ONNX Runtime
    CPU), openvino (OpenVINO CPU, FP32 unless the file is INT8) or any runtime of
    runtime.registry that runs ONNX files; the reference always runs on torch or ONNX Runtime
    CPU, or is a run saved earlier (`load_outputs`, parity.saved);
    `save_outputs` keeps both runs' outputs for a later comparison elsewhere. `keep_rate` runs an
    elastic file (`onnx --elastic`) at that rate, against torch built at that rate (or the
    reference file at that rate). `onnx_path` may be an OpenVINO IR (.xml, openvino backend).
    `precision`: the runtime's inference precision (f32, bf16, or default: the runtime's own for
    this CPU) where it offers a choice (OpenVINO); bf16 on an FP32 file is held to
    TOLERANCES["bf16"]."""
    runtime = registry.get(backend, runs=registry.ONNX).require()  # exit 2 / 3 before any work
    precision = _check_precision(precision, runtime, onnx_path)
    # a clear error for a missing or broken file, before anything else; read once: the
    # candidate's runner gets this very model
    proto = None if is_ir(onnx_path) else load_onnx(onnx_path)
    meta = read_ir_metadata(onnx_path) if proto is None else OnnxMetadata.of(proto)
    spec = meta.spec
    dense = meta.dense
    elastic_feed(meta, keep_rate, Path(onnx_path).name)  # a fixed-K file runs at its own rate only
    if keep_rate is not None and meta.elastic:
        spec = spec.at_rate(keep_rate)  # the torch reference's K (BadInputError below min_rate)
    check_batch_fits(spec, max(batch_sizes))
    warnings = []
    if sum(x is not None for x in (ckpt_path, against, load_outputs)) != 1:
        raise BadInputError("check needs exactly one reference",
                            "pass ckpt=CHECKPOINT (torch), against=OTHER.onnx or load_outputs=RUN.json")
    if tol is None:
        tol = TOLERANCES["bf16"] if precision == "bf16" and meta.precision == "fp32" else tolerance_for(meta)
        if max_abs is not None:
            tol = replace(tol, max_abs=max_abs)
    weights = nonfinite_initializers(proto) if proto is not None else None
    if ckpt_path is not None:
        ckpt = ckpt_path if isinstance(ckpt_path, Checkpoint) else load_checkpoint(ckpt_path, ema=ema)
        expected = meta.get("checkpoint_sha256")
        if expected and expected != ckpt.sha256:
            warnings.append(f"{ckpt.path.name} is not the checkpoint {Path(onnx_path).name} was "
                            "exported from (sha256 differs)")
        bad = ckpt.nonfinite()
        if bad:
            warnings.append(f"{ckpt.path.name} has non-finite weights: {describe_nonfinite(bad)}")
        # The reference is always the paper's formulation (keys for every token), whatever
        # score mode the file was exported with: a folded export is checked against it. An
        # LV-ViT keeps its stem BatchNorms, so the export's folding is checked too.
        model = build.build_model(spec, ckpt.state_dict, dense=dense, score_mode="official",
                                  fold_bn=False)
        reference = registry.get(registry.TORCH).runner(
            model, name=f"torch:{ckpt.path.name} (official scores)", selection=not dense, threads=threads)
    elif load_outputs is not None:
        reference = load_outputs_file(load_outputs)
    else:
        ref_meta = OnnxMetadata.read(against)
        if ref_meta.precision != "fp32":
            warnings.append(f"the reference {Path(against).name} is not FP32")
        ref_rate = None if ref_meta.dense else keep_rate  # a dense reference has no rate to set
        reference = _cpu_reference(against, selection=not (dense or ref_meta.dense), threads=threads,
                                   keep_rate=ref_rate)
    real = None if images is None else load_images(images, num, spec, seed=seed, what="images=")
    candidate = runtime.runner(onnx_path, name=f"{runtime.name}:{Path(onnx_path).name}", selection=not dense,
                               threads=threads, keep_rate=keep_rate, precision=precision)
    if proto is not None:
        candidate.given(proto)
    del proto
    if save_outputs is not None:
        candidate, reference = Recorder(candidate), Recorder(reference)
    n = max(batch_sizes)
    inputs = {name: input_set(name, n, spec, seed=seed) for name in input_sets}
    with candidate, reference:  # one session each for the input sets and the images
        if inputs or real is None:
            report = compare_runners(candidate, reference, inputs, list(batch_sizes), tol, spec=spec)
        else:
            report = {"a": candidate.name, "b": reference.name, "cases": [],
                      "tolerance": {k: (v if np.isfinite(v) else None) for k, v in asdict(tol).items()}}
        if real is not None:
            labels = labels_from_folders(real.files, meta.get("classes"))
            cases = compare_on_images(candidate, reference, real.array, list(batch_sizes), tol, labels,
                                      spec=spec)
            report["cases"].extend(cases)
            report["passed"] = all(c["passed"] for c in report["cases"])
            report["images"] = real.summary()
            if real.skipped:
                warnings.append(f"skipped {len(real.skipped)} unreadable file(s) in {real.source}, e.g. "
                                f"{real.skipped[0][0]} ({real.skipped[0][1]})")
    if save_outputs is not None:
        save_outputs_of(save_outputs, [candidate, reference], inputs, batch_sizes, seed, images, num)
    if weights:  # the file's own weights: the first place to look when its outputs are NaN
        warnings.append(f"{Path(onnx_path).name} has non-finite weights: {describe_nonfinite(weights)}")
    ran = getattr(candidate, "runtime_precision", None)  # OpenVINO: what it compiled for
    if precision == "bf16" and ran not in (None, "bf16"):
        warnings.append(f"this CPU has no bf16: OpenVINO ran {ran} (the bf16 tolerance was applied)")
    report["inference_precision"] = ran or precision
    report["precision"] = meta.precision
    report["backend"] = backend
    report["model"] = spec.describe() + (" (dense)" if dense else "") + (
        f" [{meta.precision}]" if meta.precision != "fp32" else "") + (
        f" at OpenVINO {precision}" if precision != "f32" else "") + (
        " (elastic file)" if meta.elastic else "")
    report["keep_rate"] = spec.keep_rate
    report["warnings"] = warnings
    return report


def _cpu_reference(path, **options):
    """The reference run of an ONNX file: ONNX Runtime on the CPU, FP32."""
    return registry.get(registry.ORT_CPU).runner(path, name=f"onnxruntime:{Path(path).name}", **options)


def _check_precision(precision: str, runtime, path) -> str:
    """precision=: f32, bf16 or default (resolved to the runtime's default for this CPU), one the
    runtime computes an FP32 graph in; and a file of a kind the runtime reads (an IR: OpenVINO)."""
    if precision not in CHECK_PRECISIONS:
        raise BadInputError(f"precision={precision!r} is not one of {', '.join(CHECK_PRECISIONS)}",
                            "use precision=f32 (default) or bf16")
    suffix = Path(path).suffix.lower()
    readers = [r.name for r in registry.RUNTIMES.values() if suffix in r.suffixes]
    if suffix not in runtime.suffixes and readers:  # another runtime's file (an IR: OpenVINO)
        raise BadInputError(f"{Path(path).name} is a {suffix} file, which backend={runtime.name!r} does not "
                            "read", f"use backend={readers[0]}")
    resolved = runtime.default_precision() if precision == "default" else precision
    if resolved not in runtime.compute_precisions:
        offer = [r.name for r in registry.RUNTIMES.values() if resolved in r.compute_precisions]
        raise BadInputError(f"backend={runtime.name!r} has no {resolved} inference precision for an FP32 "
                            "graph", f"use backend={offer[0]}" if offer else "use precision=f32")
    return resolved


def save_outputs_of(path, recorders, inputs: dict, batch_sizes, seed: int, images, num: int) -> None:
    """The recorded runs, with what a later check needs to feed the same inputs."""
    how = {"inputs": list(inputs), "batch": list(batch_sizes), "seed": seed,
           "images": None if images is None else str(images), "num": num}
    save_outputs_file(path, recorders, {"check": how})


def check_engine_against(engine: str | Path, onnx_path: str | Path | None, *, batch_sizes=(1, 7, 32),
                         input_sets=("noise", "photos"), tol=None, seed: int = 0,
                         threads: int | None = None, keep_rate: float | None = None, save_outputs=None,
                         load_outputs=None) -> dict:
    """`idle-export check X.engine --against Y.onnx`: TensorRT on the GPU against ONNX Runtime
    (FP32, CPU) on the same inputs, with the tolerance of the engine's precision; or against a
    run saved on another machine (`load_outputs`, e.g. Y.onnx checked with --save-outputs);
    keep_rate: an elastic engine and file at that rate."""

    info = inspect_engine(engine)  # sidecar problems surface before the GPU question
    if (onnx_path is None) == (load_outputs is None):
        raise BadInputError("an engine is checked against one reference",
                            "pass against=MODEL.onnx or load_outputs=RUN.json")
    reference = load_outputs_file(load_outputs) if load_outputs is not None else None
    spec = (OnnxMetadata.read(onnx_path) if onnx_path is not None
            else OnnxMetadata(info.get("model") or {})).spec
    lo, hi = info["profiles"][0]["min"][0], info["profiles"][0]["max"][0]
    sizes = [b for b in batch_sizes if lo <= b <= hi] or [hi]
    warnings = []
    if onnx_path is not None and info.get("onnx", {}).get("sha256") != sha256_file(onnx_path):
        warnings.append(f"{Path(engine).name} was built from {info['onnx']['path']}, not from "
                        f"{Path(onnx_path).name} (sha256 differs)")
    inputs = {name: input_set(name, max(sizes), spec, seed=seed) for name in input_sets}
    tol = tol or TOLERANCES[info["precision"]]
    selection = bool(info.get("selection_outputs"))
    candidate = registry.get(registry.ENGINE_RUNTIME).runner(engine, keep_rate=keep_rate)
    if reference is None:
        reference = _cpu_reference(onnx_path, selection=selection, threads=threads, keep_rate=keep_rate)
    if save_outputs is not None:
        candidate, reference = Recorder(candidate), Recorder(reference)
    report = compare_runners(candidate, reference, inputs, sizes, tol, spec=spec)
    if save_outputs is not None:
        save_outputs_of(save_outputs, [candidate, reference], inputs, sizes, seed, None, 0)
    report["model"] = spec.describe()
    report["engine"] = {k: info[k] for k in ("flavour", "trt_version", "precision", "compute_capability")}
    report["warnings"] = warnings
    return report
