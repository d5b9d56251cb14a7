"""`bench` targets: ONNX files (paired idle/dense by their metadata), engines, or one checkpoint
(exported for the ONNX backends into a work folder, one set per export target: the `ort`
backend times the `--target ort` files, `openvino` the `--target openvino` ones)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.model.checkpoint import load_checkpoint
from idle_export.model.families import family_of
from idle_export.onnx.discover import dense_twin, pick_idle_onnx, source_checkpoint
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.io import load_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.targets import file_target, runs_on
from idle_export.runtime import registry
from idle_export.trt.sidecar import read_sidecar


def variant_label(dense: bool, score_mode: str, plugin: bool = False, precision: str = "fp32") -> str:
    suffix = "" if precision == "fp32" else f"-{precision}"
    if dense:
        return "dense" + suffix
    if plugin:  # the plugin form (IdleSelect/IdleScatter; folded scores)
        return "idle-plugin" + suffix
    return ("idle-folded" if score_mode == "folded" else "idle") + suffix


@dataclass
class Targets:
    spec: object
    onnx: list[tuple[Path, bool, str]]  # (file, dense, score_mode)
    ckpt: object = None
    engines: list[tuple[Path, bool, str]] = field(default_factory=list)
    plugin: set[Path] = field(default_factory=set)  # plugin-form ONNX files, engines built --plugin
    meta: dict[Path, OnnxMetadata] = field(default_factory=dict)  # of every ONNX file
    skipped: list[str] = field(default_factory=list)  # "file on backend: why", for the report
    exported: set[Path] = field(default_factory=set)  # files bench exported from a checkpoint
    loaded: dict = field(default_factory=dict)  # ONNX models read here, for their first runner

    def take_loaded(self, path: Path):
        """The model read from `path` while resolving (once: the first runner of the file gets
        it, so the file is not read again), or None."""
        return self.loaded.pop(Path(path), None)

    def files_for(self, runtime: registry.Runtime) -> list[tuple[Path, bool, str]]:
        """The ONNX files `runtime` times, as written: INT8 files calibrated for it, and per role
        (idle per score mode and form, dense) the FP32 files written for its export target when
        there are any, else the others it runs (portable and standard-op targets)."""
        target, backend = runtime.target, runtime.name
        runnable = [f for f in self.onnx if runs_on(self.meta[f[0]], target)]

        def role(f):
            return (f[1], f[2], f[0] in self.plugin)

        fp32 = [f for f in runnable if self.meta[f[0]].precision == "fp32"]
        tuned = {role(f) for f in fp32 if file_target(self.meta[f[0]]) == target}
        chosen = [f for f in runnable if self.meta[f[0]].precision != "fp32" or role(f) not in tuned
                  or file_target(self.meta[f[0]]) == target]
        for f in self.onnx:
            if f not in chosen and f[0] not in self.exported:  # bench's own exports: by design
                why = ("a file written for that target is timed instead" if f in runnable else
                       "made for another runtime")
                self.skipped.append(f"{f[0].name} not timed on {backend}: {why}")
        return chosen


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
    plugin: set[Path] = set()
    metas: dict[Path, OnnxMetadata] = {}
    loaded: dict = {}
    exported: set[Path] = set()
    for f in onnx_files:
        proto = load_onnx(f)  # one-line error if broken
        meta = OnnxMetadata.of(proto)
        loaded[f] = proto
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
        metas[f] = meta
        if meta.form == "plugin":
            plugin.add(f)
    engine_list = []
    for e in engines:
        meta = _engine_metadata(e)
        engine_list.append((e, meta.dense, meta.score_mode))
        if read_sidecar(e).get("plugin"):
            plugin.add(e)
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
        family = family_of(spec.arch)  # EViT, DynamicViT: their own scores only
        score_modes = [m for m in score_modes if m in family.score_modes] or [family.default_scores]
        wanted = dict.fromkeys(r.target for r in _file_runtimes(backends))
        if wanted and not onnx:  # each backend's own export target, as `onnx --target` writes it
            for target in wanted:
                for dense, mode in [(False, m) for m in score_modes] + [(True, "official")]:
                    out = workdir / f"{ckpts[0].stem}_{variant_label(dense, mode)}.{target}.onnx"
                    with status(f"exporting {out.name}"):
                        export_checkpoint(ckpt, spec, out, dense=dense, score_mode=mode, target=target)
                    onnx.append((out, dense, mode))
                    metas[out] = OnnxMetadata.read(out)
                    exported.add(out)
    if spec is None:
        raise BadInputError("no model to bench", "pass ONNX files or a checkpoint")
    if onnx and not any(d for _, d, _ in onnx) and _file_runtimes(backends):
        raise BadInputError("no dense ONNX file among the targets: idle vs dense needs both",
                            "export the baseline with `idle-export onnx CKPT --dense` and pass it too")
    if onnx and all(d for _, d, _ in onnx) and _file_runtimes(backends):
        raise BadInputError("only dense ONNX files given: idle vs dense needs both",
                            "pass the idle export too")
    return Targets(spec=spec, onnx=onnx, ckpt=ckpt, engines=engine_list, plugin=plugin, meta=metas,
                   exported=exported, loaded=loaded)


def _file_runtimes(backends: list[str]) -> list[registry.Runtime]:
    """The runtimes among `backends` that run ONNX files."""
    return [r for r in map(registry.get, backends) if r.runs == registry.ONNX]


def _engine_metadata(path: Path) -> OnnxMetadata:
    """The ONNX metadata (idle_export.*) an engine's sidecar ENGINE.json carries."""
    return OnnxMetadata(dict(read_sidecar(path).get("model", {})))


def default_targets(folder: Path, status=None) -> tuple[list[Path], str]:
    """`idle-export bench` with no TARGET: the one idle export in `folder` and its dense twin,
    exporting the twin from the checkpoint beside it when it is missing. Returns the files and a
    line saying what was picked."""
    status = status or (lambda msg: contextlib.nullcontext())
    idle = pick_idle_onnx(folder, "bench")
    dense = dense_twin(idle)
    note = ""
    if dense is None:
        ckpt_path = source_checkpoint(idle)
        if ckpt_path is None:
            raise BadInputError(f"{idle.name} has no dense twin here and its checkpoint is not beside it",
                                f"export one (idle-export onnx CKPT.pth --dense) or pass both files: "
                                f"idle-export bench {idle.name} DENSE.onnx")
        dense = ckpt_path.with_name(f"{ckpt_path.stem}_dense.onnx")
        with status(f"exporting the dense twin {dense.name} from {ckpt_path.name}"):
            export_checkpoint(load_checkpoint(ckpt_path), OnnxMetadata.read(idle).spec, dense, dense=True)
        note = f" (exported from {ckpt_path.name})"
    return [idle, dense], f"bench: idle {idle.name}, dense {dense.name}{note}"
