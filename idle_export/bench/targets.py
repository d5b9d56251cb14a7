"""`bench` targets: ONNX files (paired idle/dense by their metadata), engines, or one checkpoint
(exported for the ONNX backends into a work folder)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.model.checkpoint import load_checkpoint
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.io import load_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.trt.sidecar import read_sidecar


def variant_label(dense: bool, score_mode: str) -> str:
    if dense:
        return "dense"
    return "idle-folded" if score_mode == "folded" else "idle"


@dataclass
class Targets:
    spec: object
    onnx: list[tuple[Path, bool, str]]  # (file, dense, score_mode)
    ckpt: object = None
    engines: list[tuple[Path, bool, str]] = field(default_factory=list)


def resolve_targets(paths: list[Path], *, backends: list[str], score_modes: list[str],
                    workdir: Path, ema: bool = False, status=None) -> Targets:
    """ONNX files (paired by metadata idle_export.dense) and/or one checkpoint (exported to
    `workdir` for the ONNX backends: idle per score mode, plus dense)."""

    status = status or (lambda msg: contextlib.nullcontext())
    onnx_files, engines, ckpts = [], [], []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise BadInputError(f"target not found: {p}", "pass ONNX files, engines or a checkpoint")
        suffix = p.suffix.lower()
        if suffix == ".onnx":
            onnx_files.append(p)
        elif suffix in (".engine", ".plan"):
            engines.append(p)
        elif suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
            ckpts.append(p)
        else:
            raise BadInputError(f"{p.name}: unknown target type {suffix or '(no suffix)'}",
                                "pass .onnx files, .engine files or a .pth/.safetensors checkpoint")
    if len(ckpts) > 1:
        raise BadInputError(f"{len(ckpts)} checkpoints given", "bench one checkpoint at a time")
    spec, ckpt = None, None
    onnx: list[tuple[Path, bool, str]] = []
    for f in onnx_files:
        meta = OnnxMetadata.of(load_onnx(f))  # one-line error if broken
        fspec = meta.spec
        fdense = meta.dense
        if spec is not None and (fspec.arch, fspec.embed_dim, fspec.num_classes) != (
                spec.arch, spec.embed_dim, spec.num_classes):
            raise BadInputError(f"{f.name} is a different model ({fspec.describe()}) than "
                                f"the other targets ({spec.describe()})", "bench one model at a time")
        if spec is not None and not fdense and (fspec.keep_k, fspec.idle_layers) != (
                spec.keep_k, spec.idle_layers) and any(not d for _, d, _ in onnx):
            raise BadInputError(f"{f.name} keeps K={list(fspec.keep_k)}, another idle target "
                                f"K={list(spec.keep_k)}", "bench one keep schedule at a time")
        if spec is None or not fdense:
            spec = fspec
        onnx.append((f, fdense, meta.score_mode))
    engine_list = []
    for e in engines:
        meta = _engine_metadata(e)
        engine_list.append((e, meta.dense, meta.score_mode))
        if spec is None and meta.has_spec:
            spec = meta.spec
    if ckpts:

        with status(f"loading {ckpts[0].name}"):
            ckpt = load_checkpoint(ckpts[0], ema=ema)
            cspec = ckpt.spec()
        if spec is not None and (cspec.arch, cspec.keep_k) != (spec.arch, spec.keep_k):
            raise BadInputError(f"{ckpts[0].name} ({cspec.describe()}) does not match the ONNX "
                                f"targets ({spec.describe()})", "bench one model at a time")
        spec = cspec
        if any(b in ("ort", "ort-cuda") for b in backends) and not onnx:

            for dense, mode in [(False, m) for m in score_modes] + [(True, "official")]:
                out = workdir / f"{ckpts[0].stem}_{variant_label(dense, mode)}.onnx"
                with status(f"exporting {out.name}"):
                    export_checkpoint(ckpt, spec, out, dense=dense, score_mode=mode)
                onnx.append((out, dense, mode))
    if spec is None:
        raise BadInputError("no model to bench", "pass ONNX files or a checkpoint")
    if onnx and not any(d for _, d, _ in onnx) and any(b.startswith("ort") for b in backends):
        raise BadInputError("no dense ONNX file among the targets: idle vs dense needs both",
                            "export the baseline with `idle-export onnx CKPT --dense` and pass it too")
    if onnx and all(d for _, d, _ in onnx) and any(b.startswith("ort") for b in backends):
        raise BadInputError("only dense ONNX files given: idle vs dense needs both",
                            "pass the idle export too")
    return Targets(spec=spec, onnx=onnx, ckpt=ckpt, engines=engine_list)


def _engine_metadata(path: Path) -> OnnxMetadata:
    """The ONNX metadata (idle_export.*) an engine's sidecar ENGINE.json carries."""
    return OnnxMetadata(dict(read_sidecar(path).get("model", {})))
