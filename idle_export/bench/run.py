"""`idle-export bench`: images/s of idle vs dense, measured side by side, against the FLOP ideal.

How a figure is taken (the same for every backend):
  * every runner is activated (session built, weights loaded) and warmed up before any timing;
  * inputs are made once per batch size, outside the timed region (seeded noise or photos);
  * the variants (idle, dense, folded, official …) are *interleaved*: run r times variant A, then
    B, then C, then run r+1 … so drift of a shared machine hits all of them alike;
  * a run is `iters` back-to-back calls (iters chosen from the warm-up so that a run lasts about
    `min_time` seconds); images/s of a run = batch·iters / wall time of the run;
  * reported: the median images/s over runs, the per-run spread ((max-min)/median), latency
    p50/p90/p99 over every timed call, and achieved/ideal where the FLOP model gives an ideal.
Runners return host numpy arrays, so a GPU runner's `infer` is synchronised by construction.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.fileio import atomic_write_bytes

BACKENDS = ("torch", "torch-official", "ort", "ort-cuda", "trt")
DEFAULT_BATCHES = (1, 8, 64)
# Backends that compute on the CPU: for them the process CPU time per image is reported too.
# On a shared machine it moves far less than wall time (other processes' work is not counted);
# with one thread it is the work done, with more it also counts the runtime's spinning threads.
CPU_BACKENDS = ("torch", "torch-official", "ort")


# ----------------------------------------------------------------------------- FLOP model
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
    if variant.dense or variant.official_code:
        return None if variant.dense else flops["ideal"]["official"]
    return flops["ideal"]["folded" if variant.score_mode == "folded" else "official"]


# ----------------------------------------------------------------------------- variants
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

    @property
    def key(self) -> str:
        return f"{self.backend}:{self.label}"


def variant_label(dense: bool, score_mode: str) -> str:
    if dense:
        return "dense"
    return "idle-folded" if score_mode == "folded" else "idle"


# ----------------------------------------------------------------------------- timing
def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q))


def time_calls(runner, feed: dict, iters: int) -> tuple[float, float, list[float]]:
    """Wall time and process CPU time of `iters` back-to-back calls, and each call's latency."""
    lat = []
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = clock()
    for _ in range(iters):
        t0 = clock()
        runner.infer(feed)
        lat.append(clock() - t0)
    wall = clock() - start
    return wall, time.process_time() - cpu0, lat


def summarise(batch: int, run_walls: list[float], run_iters: list[int], latencies: list[float],
              run_cpu: list[float] | None = None) -> dict:
    per_run = [batch * n / w for n, w in zip(run_iters, run_walls, strict=True)]
    med = float(np.median(per_run))
    cpu = {}
    if run_cpu:
        per_image = [c / (batch * n) for n, c in zip(run_iters, run_cpu, strict=True)]
        cpu = {"cpu_ms_per_image": float(np.median(per_image) * 1e3)}
    return {
        "images_per_s": med,
        "runs_images_per_s": [round(v, 3) for v in per_run],
        "spread": float((max(per_run) - min(per_run)) / med) if med > 0 else 0.0,
        "latency_ms": {
            "p50": percentile_ms(latencies, 50),
            "p90": percentile_ms(latencies, 90),
            "p99": percentile_ms(latencies, 99),
            "mean": float(np.mean(latencies) * 1e3),
            "min": float(np.min(latencies) * 1e3),
        },
        "calls": len(latencies),
        "iters_per_run": run_iters[0] if run_iters else 0,
        **cpu,
    }


def bench_batch(variants: list[Variant], feed: dict, batch: int, *, runs: int, warmup: int,
                min_time: float, progress=None) -> None:
    """Warm up every variant, then time them interleaved; results go to variant.results[batch]."""
    iters = {}
    for v in variants:
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1)):
            v.runner.infer(feed)
        per_call = (time.perf_counter() - t0) / max(warmup, 1)
        iters[v.key] = max(1, int(round(min_time / max(per_call, 1e-6))))
    walls: dict[str, list[float]] = {v.key: [] for v in variants}
    cpus: dict[str, list[float]] = {v.key: [] for v in variants}
    lats: dict[str, list[float]] = {v.key: [] for v in variants}
    for r in range(runs):
        # rotate the order every run so no variant always goes first after another's caches
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            if progress:
                progress(f"batch {batch}: run {r + 1}/{runs} {v.key}")
            wall, cpu, lat = time_calls(v.runner, feed, iters[v.key])
            walls[v.key].append(wall)
            cpus[v.key].append(cpu)
            lats[v.key].extend(lat)
    for v in variants:
        v.results[batch] = summarise(batch, walls[v.key], [iters[v.key]] * runs, lats[v.key],
                                     cpus[v.key] if v.backend in CPU_BACKENDS else None)


# ----------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int | None) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("idle-export", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "timm",
                 "tensorrt", "tensorrt-rtx-cu13"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "platform": platform.platform(),
        "load_average_start": load,
        "versions": versions,
        "gpu": gpu_name(),
    }


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, or None (no torch.cuda import: torch here is CPU-only)."""
    import shutil
    import subprocess

    if not Path("/dev/nvidiactl").exists() or not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return names[0] if out.returncode == 0 and names else None


def default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------- official code
class OfficialRunner:
    """The authors' IdleVisionTransformer (vit.py, eval `test=True` path) in eager PyTorch."""

    def __init__(self, model, *, threads: int | None = None, name: str = "torch-official"):
        self.model = model
        self.threads = threads
        self.name = name

    def __enter__(self):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model.eval()
        return self

    def __exit__(self, *exc):
        pass

    def infer(self, feed):
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feed["images"])))
        return {"logits": out.numpy()}


def _stub_module(name: str):
    import types

    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so `from name.sub import x` finds stubs too

    def __getattr__(attr):  # any name imported from an unused module: a harmless placeholder
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {"__init__": lambda self, *a, **k: None})

    mod.__getattr__ = __getattr__
    return mod


def load_official_vit(repo: str | Path):
    """Import the authors' vit.py from a clone of Ackesnal/IdleViT without copying it.

    Its `from utils import batch_index_select` is served by the clone's own utils.py; imports
    the eval path does not use and that are not installed are stubbed, at runtime only."""
    import importlib.util

    repo = Path(repo)
    vit_py, utils_py = repo / "vit.py", repo / "utils.py"
    if not vit_py.is_file() or not utils_py.is_file():
        raise BadInputError(f"--official-repo {repo} has no vit.py and utils.py",
                            "pass a clone of https://github.com/Ackesnal/IdleViT")
    saved = {k: sys.modules.get(k) for k in ("utils",)}
    stubs: list[str] = []
    try:
        for _ in range(10):
            try:
                utils_spec = importlib.util.spec_from_file_location("utils", utils_py)
                utils = importlib.util.module_from_spec(utils_spec)
                sys.modules["utils"] = utils
                utils_spec.loader.exec_module(utils)
                spec = importlib.util.spec_from_file_location("idle_export_official_vit", vit_py)
                module = importlib.util.module_from_spec(spec)
                with contextlib.redirect_stdout(io.StringIO()):
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        spec.loader.exec_module(module)
                return module
            except ModuleNotFoundError as e:
                if not e.name or e.name in stubs or e.name.split(".")[0] in ("torch", "timm", "numpy"):
                    raise
                stubs.append(e.name)
                sys.modules[e.name] = _stub_module(e.name)
        raise BadInputError("could not import the official vit.py", "check the clone")
    except ModuleNotFoundError as e:
        raise MissingDependencyError(f"the official vit.py needs {e.name}, which is not installed",
                                     f"pip install {e.name}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for name in stubs:
            sys.modules.pop(name, None)


def build_official_model(repo: str | Path, spec, state_dict: dict):
    """IdleVisionTransformer with the checkpoint's weights and the spec's K per layer."""
    import torch

    module = load_official_vit(repo)
    n = spec.num_patches
    # the official code keeps int(N * ratio) tokens; (K + 0.5) / N gives exactly K for any K
    ratios = [(k + 0.5) / n for k in spec.keep_k]
    with contextlib.redirect_stdout(io.StringIO()):
        model = module.IdleVisionTransformer(
            img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim,
            depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=4, qkv_bias=True,
            num_classes=spec.num_classes, idle_layers=list(spec.idle_layers), keep_ratios=ratios)
    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise BadInputError(f"the official model misses weights {missing[:3]} in the checkpoint",
                            "pass a DeiT IdleViT checkpoint (timm key names)")
    return model.eval()


# ----------------------------------------------------------------------------- targets
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
    from idle_export.model.config import ModelSpec
    from idle_export.runtime.runners import load_onnx

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
        meta = {p.key: p.value for p in load_onnx(f).metadata_props}  # one-line error if broken
        fspec = ModelSpec.from_metadata(meta)
        fdense = bool(json.loads(meta.get("idle_export.dense", "false")))
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
        onnx.append((f, fdense, json.loads(meta.get("idle_export.score_mode", '"official"'))))
    engine_list = []
    for e in engines:
        meta = _engine_metadata(e)
        edense = bool(json.loads(meta.get("idle_export.dense", "false")))
        engine_list.append((e, edense, json.loads(meta.get("idle_export.score_mode", '"official"'))))
        if spec is None and "idle_export.arch" in meta:
            spec = ModelSpec.from_metadata(meta)
    if ckpts:
        from idle_export.model.checkpoint import load_checkpoint

        with status(f"loading {ckpts[0].name}"):
            ckpt = load_checkpoint(ckpts[0], ema=ema)
            cspec = ckpt.spec()
        if spec is not None and (cspec.arch, cspec.keep_k) != (spec.arch, spec.keep_k):
            raise BadInputError(f"{ckpts[0].name} ({cspec.describe()}) does not match the ONNX "
                                f"targets ({spec.describe()})", "bench one model at a time")
        spec = cspec
        if any(b in ("ort", "ort-cuda") for b in backends) and not onnx:
            from idle_export.onnx.export import export_checkpoint

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


def _engine_metadata(path: Path) -> dict:
    """The ONNX metadata (idle_export.*) an engine's sidecar ENGINE.json carries."""
    from idle_export.trt.engine import read_sidecar  # the engine step's reader: a clear error without one

    return dict(read_sidecar(path).get("model", {}))


# ----------------------------------------------------------------------------- backends
def make_variants(targets: Targets, backends: list[str], *, threads: int | None,
                  score_modes: list[str], optimize: bool, official_repo: Path | None) -> list[Variant]:
    """One Variant per (backend, model); runners are created lazily (activate happens later)."""
    variants: list[Variant] = []
    for backend in backends:
        if backend in ("ort", "ort-cuda"):
            providers = _ort_providers(backend)
            labels = _unique_labels([(variant_label(d, m), p) for p, d, m in targets.onnx])
            for (path, dense, mode), label in zip(targets.onnx, labels, strict=True):
                variants.append(Variant(
                    backend, label, dense, mode, file=str(path),
                    make_runner=_ort_factory(path, providers, threads, optimize, backend)))
        elif backend == "torch":
            ckpt = _need_ckpt(targets, backend)
            for dense, mode in [(False, m) for m in score_modes] + [(True, "official")]:
                variants.append(Variant(backend, variant_label(dense, mode), dense, mode,
                                        make_runner=_torch_factory(targets.spec, ckpt, dense, mode, threads)))
        elif backend == "torch-official":
            ckpt = _need_ckpt(targets, backend)
            if official_repo is None:
                raise BadInputError("the torch-official backend needs the authors' code",
                                    "git clone https://github.com/Ackesnal/IdleViT and pass "
                                    "--official-repo PATH")
            spec = targets.spec

            def factory(spec=spec, ckpt=ckpt):
                return OfficialRunner(build_official_model(official_repo, spec, ckpt.state_dict),
                                      threads=threads)

            variants.append(Variant(backend, "official", False, "official", official_code=True,
                                    make_runner=factory))
        elif backend == "trt":
            variants.extend(_trt_variants(targets))
        else:
            raise BadInputError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    return variants


def _need_ckpt(targets: Targets, backend: str):
    if targets.ckpt is None:
        raise BadInputError(f"the {backend} backend needs the checkpoint (ONNX files carry no "
                            "PyTorch model)", "pass the .pth checkpoint as a TARGET too")
    return targets.ckpt


def _ort_providers(backend: str) -> list[str]:
    from idle_export.runtime.runners import ort_available_providers

    if backend == "ort":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort_available_providers():
        raise MissingDependencyError("the ort-cuda backend needs onnxruntime-gpu and a GPU "
                                     "(CUDAExecutionProvider is not available here)",
                                     "use --backend ort (CPU) or install onnxruntime-gpu on a GPU machine")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _ort_factory(path, providers, threads, optimize, backend):
    def factory():
        from idle_export.runtime.runners import OrtRunner

        return OrtRunner(path, name=f"{backend}:{Path(path).name}", providers=providers,
                         threads=threads, optimize=optimize)

    return factory


def _torch_factory(spec, ckpt, dense, mode, threads):
    def factory():
        from idle_export.model.vit import build_model
        from idle_export.runtime.runners import TorchRunner

        model = build_model(spec, ckpt.state_dict, dense=dense, score_mode=mode)
        return TorchRunner(model, name=f"torch:{variant_label(dense, mode)}", threads=threads)

    return factory


def _trt_variants(targets: Targets) -> list[Variant]:
    if gpu_name() is None:
        raise MissingDependencyError("the trt backend needs a GPU (no NVIDIA GPU found); TensorRT "
                                     "engines can be built here but not run",
                                     "run the bench on a machine with an NVIDIA GPU, or use --backend ort")
    try:
        from idle_export.trt.engine import TrtRunner  # written by the engine step; imported only here
    except ImportError as e:
        raise MissingDependencyError(f"the trt backend is unavailable ({e})",
                                     "install the TensorRT runtime: pip install idle-export[trt]") from None
    if not targets.engines:
        raise BadInputError("the trt backend needs engine files (.engine)",
                            "build them with `idle-export trt MODEL.onnx` and pass them as TARGETs")
    labels = _unique_labels([(variant_label(d, m), p) for p, d, m in targets.engines])
    return [Variant("trt", label, d, m, file=str(p), make_runner=(lambda p=p: TrtRunner(p)))
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


# ----------------------------------------------------------------------------- independent timing
INDEPENDENT_SCRIPT = r"""
import sys, time, timeit, json
import numpy as np, onnxruntime as ort
path, batch, threads, number, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32)
name = sess.get_inputs()[0].name
timer = timeit.Timer(lambda: sess.run(None, {name: x}))
timer.timeit(2)
best = sorted(t / number for t in timer.repeat(repeat=repeat, number=number))
cpu = timeit.Timer(lambda: sess.run(None, {name: x}), timer=time.process_time)
cpu_best = sorted(t / number for t in cpu.repeat(repeat=repeat, number=number))
print(json.dumps({"median_s": best[len(best) // 2], "min_s": best[0],
                  "cpu_median_s": cpu_best[len(cpu_best) // 2]}))
"""


def independent_timing(path: Path, batch: int, threads: int, *, per_call_s: float,
                       repeat: int = 5, min_time: float = 1.0) -> dict:
    """Time one ONNX file in a separate Python process with timeit and a plain ORT session
    (nothing shared with the bench loop but the file; idle_export is not imported there):
    a check on the bench's own figures."""
    import subprocess

    number = max(1, int(round(min_time / max(per_call_s, 1e-6))))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", INDEPENDENT_SCRIPT, str(path), str(batch), str(threads),
                          str(number), str(repeat)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"file": str(path), "batch": batch, "error": tail}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"file": str(path), "batch": batch, "images_per_s": batch / res["median_s"],
            "cpu_ms_per_image": res["cpu_median_s"] / batch * 1e3,
            "calls_per_repeat": number, "repeats": repeat, "method": "timeit, separate process"}


# ----------------------------------------------------------------------------- main entry
def run_bench(paths: list[Path], *, backends: list[str], batches: list[int], threads: int | None = None,
              runs: int = 5, warmup: int = 3, min_time: float = 1.0, inputs: str = "noise",
              score_modes: list[str] | None = None, optimize: bool = True,
              official_repo: Path | None = None, independent: bool = False, ema: bool = False,
              seed: int = 0, status=None, workdir: Path | None = None) -> dict:
    """Benchmark idle vs dense (and the official code) on every backend; the JSON report."""
    import shutil
    import tempfile

    from idle_export.data.inputs import input_set

    status = status or (lambda msg: contextlib.nullcontext())
    score_modes = score_modes or ["official"]
    if not batches or min(batches) < 1:
        raise BadInputError(f"--batch {batches} needs positive sizes", "e.g. --batch 1,8,64")
    batches = list(dict.fromkeys(batches))
    if runs < 1 or warmup < 0 or min_time <= 0:
        raise BadInputError("--runs must be ≥ 1, --warmup ≥ 0, --min-time > 0", "e.g. --runs 5 --warmup 3")
    if inputs not in ("noise", "photos"):
        raise BadInputError(f"--inputs {inputs!r} is not noise or photos", "use --inputs noise")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise BadInputError(f"unknown backend {', '.join(unknown) or '(none)'}",
                            f"use one or more of {', '.join(BACKENDS)}")
    threads = threads or default_threads()
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="idle-export-bench-")) if own_tmp else Path(workdir)
    try:
        targets = resolve_targets(paths, backends=backends, score_modes=score_modes, workdir=workdir,
                                  ema=ema, status=status)
        spec = targets.spec
        flops = flop_model(spec)
        env = environment(threads)
        variants = make_variants(targets, backends, threads=threads, score_modes=score_modes,
                                 optimize=optimize, official_repo=official_repo)
        _set_torch_threads(backends, threads)
        with contextlib.ExitStack() as stack:
            for v in variants:
                with status(f"loading {v.key}"):
                    v.runner = stack.enter_context(v.make_runner())
            pool = input_set(inputs, max(batches), spec, seed=seed)
            # variants of one backend are interleaved; backends go one after the other, so one
            # runtime's spinning worker threads never steal cores from another's timed calls
            groups = [[v for v in variants if v.backend == b] for b in dict.fromkeys(backends)]
            for bs in batches:
                feed = {"images": np.ascontiguousarray(pool[:bs])}
                for group in (g for g in groups if g):
                    with status(f"batch {bs}") as st:
                        bench_batch(group, feed, bs, runs=runs, warmup=warmup, min_time=min_time,
                                    progress=(lambda m, st=st: st.update(m)) if hasattr(st, "update")
                                    else None)
        from idle_export.onnx.passes import DEFAULT_PASSES

        report = build_report(spec, flops, env, variants, batches, targets,
                              settings=dict(batch=batches, backends=backends, runs=runs,
                                            warmup=max(warmup, 1), min_time_s=min_time, threads=threads,
                                            inputs=inputs, seed=seed, optimize=optimize,
                                            passes=list(DEFAULT_PASSES) if optimize else [],
                                            score_modes=score_modes))
        if independent:
            report["independent"] = independent_checks(variants, batches, threads, optimize, min_time,
                                                       status, workdir)
        try:
            report["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
        return report
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def _set_torch_threads(backends: list[str], threads: int) -> None:
    if any(b.startswith("torch") for b in backends):
        import torch

        torch.set_num_threads(threads)


def independent_checks(variants, batches, threads, optimize, min_time, status, workdir: Path) -> list[dict]:
    """The bench's ORT figures re-measured by `independent_timing`; with --optimize the file timed
    is the optimised graph the bench ran, written out beside the temporary exports."""
    import onnx

    from idle_export.onnx.passes import optimize_model_proto
    from idle_export.runtime.runners import load_onnx

    checks = []
    for v in variants:
        if v.backend != "ort" or not v.file:
            continue
        timed = Path(v.file)
        if optimize:
            timed = workdir / f"{timed.stem}.optimized.onnx"
            onnx.save(optimize_model_proto(load_onnx(v.file)), str(timed))
        for bs in batches:
            per_call = v.results[bs]["latency_ms"]["p50"] / 1e3
            with status(f"independent timing of {timed.name} at batch {bs}"):
                c = independent_timing(timed, bs, threads, per_call_s=per_call, min_time=min_time)
            c["file"] = v.file
            c["optimized"] = optimize
            if "images_per_s" in c:
                c["bench_images_per_s"] = v.results[bs]["images_per_s"]
                c["ratio"] = c["bench_images_per_s"] / c["images_per_s"]
                c["agree_within_10pct"] = abs(c["ratio"] - 1) <= 0.10
                c["bench_cpu_ms_per_image"] = v.results[bs]["cpu_ms_per_image"]
                c["cpu_ratio"] = c["cpu_ms_per_image"] / c["bench_cpu_ms_per_image"]
                c["cpu_agree_within_10pct"] = abs(c["cpu_ratio"] - 1) <= 0.10
            c["variant"] = v.key
            checks.append(c)
    return checks


def _cpu_ratio(result: dict, baseline: dict, ideal: float | None) -> dict:
    if "cpu_ms_per_image" not in result or "cpu_ms_per_image" not in baseline:
        return {}
    ratio = baseline["cpu_ms_per_image"] / result["cpu_ms_per_image"]
    return {"cpu_speedup": ratio, "cpu_over_ideal": ratio / ideal if ideal else None}


def build_report(spec, flops, env, variants, batches, targets, *, settings) -> dict:
    results = []
    for v in variants:
        for bs in batches:
            results.append({"backend": v.backend, "variant": v.label, "file": v.file, "batch": bs,
                            **v.results[bs]})
    comparisons = []
    by_key = {(v.backend, v.label): v for v in variants}
    for v in variants:
        if v.dense:
            continue
        dense = by_key.get((v.backend, "dense"))
        if dense is None and v.official_code:
            dense = by_key.get(("torch", "dense"))
        ideal = ideal_for(v, flops)
        for bs in batches:
            if dense is not None:
                speedup = v.results[bs]["images_per_s"] / dense.results[bs]["images_per_s"]
                comparisons.append({
                    "backend": v.backend, "variant": v.label, "baseline": dense.key, "batch": bs,
                    "speedup": speedup, "ideal": ideal,
                    "achieved_over_ideal": speedup / ideal if ideal else None,
                    **_cpu_ratio(v.results[bs], dense.results[bs], ideal)})
    official = by_key.get(("torch-official", "official"))
    if official is not None:
        for v in variants:
            if v.official_code or v.dense:
                continue
            for bs in batches:
                comparisons.append({
                    "backend": v.backend, "variant": v.label, "baseline": official.key, "batch": bs,
                    "speedup": v.results[bs]["images_per_s"] / official.results[bs]["images_per_s"],
                    "ideal": None, "achieved_over_ideal": None,
                    **_cpu_ratio(v.results[bs], official.results[bs], None)})
    from idle_export import __version__

    return {
        "tool": f"idle-export {__version__} bench",
        "model": spec.describe(),
        "spec": {k: json.loads(v) for k, v in spec.to_metadata().items()},
        "flops": flops,
        "settings": settings,
        "environment": env,
        "files": [{"file": str(p), "dense": d, "score_mode": m} for p, d, m in targets.onnx],
        "results": results,
        "comparisons": comparisons,
        "noise": {"spread_threshold": NOISY_SPREAD,
                  "noisy": [f"{r['backend']}:{r['variant']}@{r['batch']}" for r in noisy_results(results)]},
    }


# ----------------------------------------------------------------------------- output
NOISY_SPREAD = 0.10  # (max - min) / median of the per-run images/s above which a figure is flagged


def noisy_results(results: list[dict]) -> list[dict]:
    """The results whose run-to-run spread says the machine was busy while they were timed."""
    return [r for r in results if r.get("spread", 0.0) > NOISY_SPREAD]


def print_report(report: dict, console=None) -> None:
    """Two rich tables: per-variant figures, then idle vs baseline against the FLOP ideal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    env, st = report["environment"], report["settings"]
    g = report["flops"]["gmacs"]
    ideal = report["flops"]["ideal"]
    table = Table(title=f"idle-export bench: {report['model']}")
    for col in ("backend", "variant", "batch", "images/s", "p50 ms", "p90 ms", "p99 ms", "spread",
                "CPU ms/img"):
        table.add_column(col, justify="left" if col in ("backend", "variant") else "right")
    for r in report["results"]:
        lat = r["latency_ms"]
        cpu = f"{r['cpu_ms_per_image']:.2f}" if "cpu_ms_per_image" in r else "-"
        table.add_row(r["backend"], r["variant"], str(r["batch"]), f"{r['images_per_s']:.1f}",
                      f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{r['spread']:.1%}",
                      cpu)
    console.print(table)
    comp = Table(title="speed-up (images/s ratio) vs FLOP ideal")
    for col in ("backend", "variant", "vs", "batch", "speed-up", "ideal", "achieved/ideal",
                "CPU-time speed-up", "CPU/ideal"):
        comp.add_column(col, justify="left" if col in ("backend", "variant", "vs") else "right")
    for c in report["comparisons"]:
        comp.add_row(c["backend"], c["variant"], c["baseline"], str(c["batch"]), f"{c['speedup']:.2f}x",
                     "-" if c["ideal"] is None else f"{c['ideal']:.2f}x", _coloured(c["achieved_over_ideal"]),
                     f"{c['cpu_speedup']:.2f}x" if "cpu_speedup" in c else "-",
                     _coloured(c.get("cpu_over_ideal")))
    console.print(comp)
    for c in report.get("independent", []):
        if "ratio" in c:
            colour = "" if c["agree_within_10pct"] else "[yellow]"
            console.print(f"{colour}independent timing (timeit, own process) {Path(c['file']).name} batch "
                          f"{c['batch']}: {c['images_per_s']:.1f} images/s, {c['cpu_ms_per_image']:.2f} "
                          f"CPU ms/img; bench/independent {c['ratio']:.3f} (CPU time {c['cpu_ratio']:.3f})"
                          + ("[/]" if colour else ""))
        else:
            console.print(f"[yellow]independent timing of {c['file']} failed: {c.get('error')}[/]")
    noisy = noisy_results(report["results"])
    if noisy:
        worst = max(noisy, key=lambda r: r["spread"])
        console.print(f"[yellow]noisy timing: {len(noisy)} of {len(report['results'])} figures vary by more "
                      f"than {NOISY_SPREAD:.0%} from run to run (worst {worst['spread']:.0%}, "
                      f"{worst['variant']} batch {worst['batch']}); the machine is busy: trust the CPU-time "
                      f"ratios more than images/s, or re-run when it is quiet[/]")
    console.print(f"GMACs/image dense {g['dense']:.2f}, idle {g['idle']:.2f} "
                  f"(ideal {ideal['official']:.2f}x), "
                  f"idle folded scores {g['idle_folded']:.2f} (ideal {ideal['folded']:.2f}x); "
                  f"{st['threads']} threads on {env['cpu']}; load average {env.get('load_average_start')}"
                  f" → {env.get('load_average_end')}")


def _coloured(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    colour = "green" if ratio >= 0.95 else "yellow" if ratio >= 0.9 else "red"
    return f"[{colour}]{ratio:.2f}[/]"


def plot_report(report: dict, path: Path) -> Path:
    """images/s vs batch per backend: idle (solid), dense (dashed), dense × FLOP ideal (dotted)."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib", "pip install idle-export[bench]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(backends), figsize=(5.2 * len(backends), 4.2), squeeze=False)
    ideal = report["flops"]["ideal"]
    for ax, backend in zip(axes[0], backends, strict=True):
        rows = [r for r in report["results"] if r["backend"] == backend]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        dense_rows = sorted((r for r in rows if r["variant"] == "dense"), key=lambda r: r["batch"])
        for var in variants:
            pts = sorted((r for r in rows if r["variant"] == var), key=lambda r: r["batch"])
            ax.plot([p["batch"] for p in pts], [p["images_per_s"] for p in pts],
                    marker="o", linestyle="--" if var.startswith("dense") else "-", label=var)
        if dense_rows:
            xs = [r["batch"] for r in dense_rows]
            for name, factor in (("official", ideal["official"]), ("folded", ideal["folded"])):
                if name == "folded" and "idle-folded" not in variants:
                    continue
                ax.plot(xs, [r["images_per_s"] * factor for r in dense_rows], linestyle=":",
                        color="grey" if name == "official" else "black",
                        label=f"ideal ({name} scores, dense × {factor:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(backend)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    n = report["settings"]["threads"]
    fig.suptitle(f"{report['model']} — {n} thread{'s' if n != 1 else ''}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
