"""What `bench` times: one Variant per (backend, model), its runner made lazily, and the FLOP
model that gives each idle variant its ideal speed-up over dense."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from idle_export.bench.targets import Targets, variant_label
from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.lazy import lazy_module
from idle_export.model.families import family_of
from idle_export.onnx.targets import file_passes, file_target
from idle_export.runtime import registry
from idle_export.runtime.official import build_official_model
from idle_export.runtime.openvino_ir import ir_beside
from idle_export.trt.sidecar import read_sidecar

build = lazy_module("idle_export.model.build")  # torch


def flop_model(spec) -> dict:
    """GMACs per image from ModelSpec.macs and the ideal idle/dense speed-ups."""
    dense = spec.macs(dense=True)
    idle = spec.macs()
    folded = spec.macs(folded_scores=True)
    return {
        "gmacs": {"dense": dense / 1e9, "idle": idle / 1e9, "idle_folded": folded / 1e9},
        "ideal": {"official": dense / idle, "folded": dense / folded},
    }


def ideal_for(variant: Variant, flops: dict) -> float | None:
    if variant.keep_rate is not None and not variant.dense:  # an elastic file at one of its rates
        flops = flop_model(variant.spec)
    if variant.dense or variant.official_code:
        return None if variant.dense else flops["ideal"]["official"]
    return flops["ideal"]["folded" if variant.score_mode == "folded" else "official"]


@dataclass
class Variant:
    """One thing to time: a backend running one model (idle, dense, folded, official code)."""

    backend: str
    label: str  # idle | idle-folded | dense | official
    dense: bool = False
    score_mode: str = "official"
    official_code: bool = False
    file: str | None = None
    make_runner: object = None  # () -> Runner
    runner: object = None
    results: dict = field(default_factory=dict)
    precision: str = "fp32"
    target: str | None = None  # the export target the ONNX file was written for
    file_passes: list[str] = field(default_factory=list)  # graph passes in the file as written
    keep_rate: float | None = None  # an elastic file (or engine) run at this rate (bench --keep-rate)
    spec: object = None  # the ModelSpec at keep_rate (its FLOP ideal)
    selection_f32: bool = False  # an IR whose token scores stay f32 whatever the precision

    @property
    def passes_at_load(self) -> list[str]:
        """Passes the runner applied in memory (bench --optimize on a file that lacked them)."""
        return list(getattr(self.runner, "passes_at_load", []) or [])

    def graph(self) -> dict:
        """What was timed: the file's target and passes, and any applied at load."""
        return {"precision": self.precision, "target": self.target, "passes_in_file": self.file_passes,
                "passes_at_load": self.passes_at_load}

    @property
    def key(self) -> str:
        return f"{self.backend}:{self.label}"


def make_variants(targets: Targets, backends: list[str], *, threads: int | None,
                  score_modes: list[str], optimize: bool, official_repo: Path | None,
                  keep_rates: list[float] | None = None) -> list[Variant]:
    """One Variant per (backend, model); runners are created lazily (activate happens later).
    keep_rates: each elastic file (and engine) once per rate, labelled LABEL-elastic@RATE."""
    variants = _make_variants(targets, backends, threads=threads, score_modes=score_modes,
                              optimize=optimize, official_repo=official_repo)
    if not keep_rates:
        return variants
    out = []
    for v in variants:
        if v.file is None or v.dense or not _is_elastic(targets, Path(v.file)):
            out.append(v)
            continue
        for rate in keep_rates:
            out.append(replace(v, label=f"{v.label}-elastic@{rate:g}", keep_rate=rate,
                               spec=targets.spec.at_rate(rate), make_runner=_at_rate(v.make_runner, rate),
                               results={}))
    if not any(v.keep_rate is not None for v in out):
        raise BadInputError("keep_rates= times an elastic file at several rates; no target is elastic",
                            "export one with `idle-export onnx CKPT --elastic` and pass it")
    return out


def _is_elastic(targets: Targets, path: Path) -> bool:
    if path in targets.meta:
        return targets.meta[path].elastic is not None
    return bool(read_sidecar(path).get("elastic"))  # an engine built with `trt --elastic`


def _at_rate(factory, rate: float):
    """The factory's runner, set to run at `rate` (every runner takes keep_rate)."""
    def make():
        runner = factory()
        runner.keep_rate = rate
        return runner

    return make


def _make_variants(targets: Targets, backends: list[str], *, threads: int | None,
                   score_modes: list[str], optimize: bool, official_repo: Path | None) -> list[Variant]:
    variants: list[Variant] = []
    family = family_of(targets.spec.arch)  # EViT, DynamicViT: their own scores only
    score_modes = [m for m in score_modes if m in family.score_modes] or [family.default_scores]
    for backend in backends:
        runtime = registry.get(backend)
        if runtime.runs == registry.ONNX:
            variants.extend(_file_variants(targets, runtime.require(), threads, optimize))
        elif runtime.runs == registry.ENGINE:
            variants.extend(_trt_variants(targets, runtime))
        elif runtime.official:
            ckpt = _need_ckpt(targets, backend)
            if not family_of(targets.spec.arch).official_code:
                raise BadInputError(f"the {backend} backend runs the authors' DeiT code (vit.py) "
                                    f"only, not {targets.spec.arch}", "use backends=torch,ort")
            if official_repo is None:
                raise BadInputError(f"the {backend} backend needs the authors' code",
                                    "git clone https://github.com/Ackesnal/IdleViT and pass "
                                    "official_repo=PATH")
            spec = targets.spec

            def factory(spec=spec, ckpt=ckpt, runtime=runtime):
                return runtime.runner(build_official_model(official_repo, spec, ckpt.state_dict),
                                      threads=threads)

            variants.append(Variant(backend, "official", False, "official", official_code=True,
                                    make_runner=factory))
        else:  # the checkpoint's torch model
            ckpt = _need_ckpt(targets, backend)
            for dense, mode in [(False, m) for m in score_modes] + [(True, "official")]:
                variants.append(Variant(backend, variant_label(dense, mode), dense, mode,
                                        make_runner=_torch_factory(runtime, targets.spec, ckpt, dense, mode,
                                                                   threads)))
    return variants


def _file_variants(targets: Targets, runtime, threads, optimize) -> list[Variant]:
    """The ONNX files `runtime` times (Targets.files_for), and, where the runtime's own default
    precision is not f32: each dense file at that default, the peer's best (OpenVINO's dense in
    bf16 on AMX / AVX-512 BF16, which it would run unless told f32; an INT8 dense file with bf16
    between its INT8 GEMMs), and the marked IR beside each idle file (`onnx`/`calibrate --target
    openvino`: X.xml) at that default, its token scores in f32."""
    backend = runtime.name
    files = targets.files_for(runtime)
    if targets.onnx and (not any(d for _, d, _ in files) or all(d for _, d, _ in files)):
        raise BadInputError(f"no idle/dense pair of ONNX files for the {backend} backend "
                            f"({'; '.join(targets.skipped) or 'none given'})",
                            f"pass an idle and a dense file it runs, e.g. exported with "
                            f"`idle-export onnx CKPT --target {runtime.target}`")
    metas = [targets.meta[p] for p, _, _ in files]
    labels = _unique_labels([(variant_label(d, m, p in targets.plugin, meta.precision), p)
                             for (p, d, m), meta in zip(files, metas, strict=True)])
    default = runtime.default_precision()
    variants = []
    for (path, dense, mode), label, meta in zip(files, labels, metas, strict=True):
        variants.append(Variant(
            backend, label, dense, mode, file=str(path),
            make_runner=_file_factory(runtime, path, threads, optimize, targets), precision=meta.precision,
            target=file_target(meta), file_passes=file_passes(meta)))
        if default in ("f32", "fp32"):
            continue
        at_default = default if meta.precision == "fp32" else f"{meta.precision}+{default}"
        if dense:  # the peer's best: its dense (FP32 or INT8 file) at the runtime's default
            variants.append(Variant(
                backend, f"{label}@{default}", dense, mode, file=str(path), precision=at_default,
                make_runner=_file_factory(runtime, path, threads, optimize, targets, precision="default"),
                target=file_target(meta), file_passes=file_passes(meta)))
        elif ".xml" in runtime.suffixes and (ir := ir_beside(path)) is not None:
            # the marked IR beside the file: the runtime's default precision, the scores in f32
            variants.append(Variant(
                backend, f"{label}@{default}", dense, mode, file=str(ir), selection_f32=True,
                precision=at_default,
                make_runner=lambda ir=ir: runtime.runner(ir, threads=threads, precision="default"),
                target=file_target(meta), file_passes=file_passes(meta)))
    return variants


def _need_ckpt(targets: Targets, backend: str):
    if targets.ckpt is None:
        raise BadInputError(f"the {backend} backend needs the checkpoint (ONNX files carry no "
                            "PyTorch model)", "pass the .pth checkpoint as a TARGET too")
    return targets.ckpt


def _file_factory(runtime, path, threads, optimize, targets: Targets, precision: str | None = None):
    def factory():
        runner = runtime.runner(path, threads=threads, optimize=optimize, precision=precision)
        runner.given(targets.take_loaded(path), targets.meta.get(Path(path)))
        return runner

    return factory


def _torch_factory(runtime, spec, ckpt, dense, mode, threads):
    def factory():
        model = build.build_model(spec, ckpt.state_dict, dense=dense, score_mode=mode)
        return runtime.runner(model, name=f"{runtime.name}:{variant_label(dense, mode)}", threads=threads)

    return factory


def _trt_variants(targets: Targets, runtime) -> list[Variant]:
    if runtime.unavailable():
        sources = [read_sidecar(p).get("onnx", {}).get("path") for p, _, _ in targets.engines]
        sources += [p.name for p, _, _ in targets.onnx]
        instead = " ".join(dict.fromkeys(s for s in sources if s)) or "IDLE.onnx DENSE.onnx"
        raise MissingDependencyError("benching TensorRT needs a GPU, and this machine has no NVIDIA GPU "
                                     "(engines can be built here, not run)",
                                     f"bench the ONNX instead: idle-export bench {instead}")
    if not targets.engines:
        raise BadInputError("the trt backend needs engine files (.engine)",
                            "build them with `idle-export trt MODEL.onnx` and pass them as TARGETs")
    labels = _unique_labels([(variant_label(d, m, p in targets.plugin), p)
                             for p, d, m in targets.engines])
    return [Variant(runtime.name, label, d, m, file=str(p), make_runner=(lambda p=p: runtime.runner(p)))
            for (p, d, m), label in zip(targets.engines, labels, strict=True)]


def _unique_labels(items: list[tuple[str, Path]]) -> list[str]:
    """idle / idle-folded / dense, with the file name added where two files share a label
    (e.g. an FP32 and an INT8 idle export); the first dense stays the baseline 'dense'."""
    seen: dict[str, int] = {}
    out = []
    for label, path in items:
        out.append(label if label not in seen else f"{label}({Path(path).stem})")
        seen[label] = seen.get(label, 0) + 1
    return out
