"""The public Python API: the library functions that the `idle-export` commands call, for
notebooks and training scripts (examples in docs/api.md).

    from idle_export import api

    ckpt = api.load_checkpoint("deit_s_r0.7.pth")
    api.export_onnx(ckpt, "deit_s_idle.onnx")
    api.export_onnx(ckpt, "deit_s_dense.onnx", dense=True)
    assert api.check("deit_s_idle.onnx", ckpt=ckpt)["passed"]

Importing this module loads no torch, onnx or ONNX Runtime; each function loads what it needs
when it is called. Failures raise the errors the CLI prints as one line
(idle_export.errors): BadInputError for unusable input, MissingDependencyError when an extra is
not installed (its `hint` is the pip command), CheckFailedError only where a function says so.
Reports are the dicts that the commands write with `--json`. The functions live in api.py
(check, lint, quantize, bench, open_model, runtimes, demo), api_export.py (checkpoints, ONNX,
OpenVINO IR, engines), api_explore.py (show, sweep) and api_serve.py (Triton repositories and
queries); this module holds them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from idle_export.api_explore import show, sweep
from idle_export.api_export import (
    CheckpointLike,
    PathLike,
    _check_scores,
    build_engine,
    default_onnx_path,
    export_onnx,
    load_checkpoint,
    model_spec,
    torch_model,
    write_openvino_ir,
)
from idle_export.api_serve import serve_bench, serve_query, serve_repo, serve_run
from idle_export.bench.plot import plot_report, require_matplotlib
from idle_export.bench.run import run_bench
from idle_export.bench.targets import default_targets
from idle_export.demo import run_demo
from idle_export.errors import BadInputError
from idle_export.fileio import check_output_path
from idle_export.hardware import check_threads
from idle_export.model.checkpoint import Checkpoint
from idle_export.model.config import ModelSpec, check_keep_rate
from idle_export.onnx.io import check_batch_sizes
from idle_export.onnx.lint import lint_file
from idle_export.parity.check import check_engine_against, check_onnx
from idle_export.quantize.qdq import default_int8_path, quantize_onnx
from idle_export.runtime import registry
from idle_export.runtime.base import Runner
from idle_export.runtime.openvino_ir import write_ir

__all__ = ["Checkpoint", "ModelSpec", "bench", "build_engine", "check", "default_onnx_path", "demo",
           "export_onnx", "lint", "load_checkpoint", "model_spec", "open_model", "quantize", "runtimes",
           "serve_bench", "serve_query", "serve_repo", "serve_run", "show", "sweep", "torch_model",
           "write_openvino_ir"]

ENGINE_SUFFIXES = (".engine", ".plan")


def check(model: PathLike, *, ckpt: CheckpointLike | None = None, against: PathLike | None = None,
          ema: bool = False, batch_sizes: Sequence[int] = (1, 7, 32),
          inputs: Sequence[str] | None = None, images: PathLike | None = None, num: int = 0,
          max_abs: float | None = None, seed: int = 0, threads: int | None = None,
          backend: str = "ort", keep_rate: float | None = None, save_outputs: PathLike | None = None,
          load_outputs: PathLike | None = None, precision: str = "f32") -> dict:
    """Parity of an ONNX file (or a TensorRT engine) against a reference (`idle-export check`).

    The reference is the PyTorch model of `ckpt` (a path or a loaded Checkpoint), another ONNX
    file `against` (an engine is checked against the ONNX it was built from), or a run saved
    earlier with `save_outputs` (`load_outputs`: Polygraphy RunResults JSON, e.g. the FP32 ONNX
    run on the build machine, for an engine run on a GPU machine). `inputs` are the input sets,
    "noise" and/or "photos" (default both; none when `images` is given); `images` is a folder, a
    .txt list or one image (`num` of them, 0: all). The tolerance follows the model's precision
    (fp32 1e-4, fp16 5e-2, int8 top-1 agreement) unless `max_abs` sets the logit tolerance.
    `backend` runs the ONNX file: "ort" (ONNX Runtime CPU), "openvino" (OpenVINO CPU) or another
    runtime of `runtimes()` that runs ONNX files. `keep_rate` runs an elastic file (or engine)
    at that rate, against the reference at the same rate. With backend "openvino", `model` may
    be the OpenVINO IR (X.xml) and `precision` is OpenVINO's inference precision: "f32", "bf16"
    (the bf16 tolerance, ties counted) or "default".

    Returns the report: `report["passed"]` is the verdict, `report["cases"]` one entry per input
    set and batch size. A failed comparison is not an exception; a bad file or option is.
    """
    sizes = check_batch_sizes(batch_sizes, "batch_sizes", "1,7,32")
    sets = list(inputs) if inputs is not None else ([] if images is not None else ["noise", "photos"])
    unknown = [s for s in sets if s not in ("noise", "photos")]
    if unknown or (not sets and images is None):
        raise BadInputError(f"inputs={','.join(sets)}: unknown set {', '.join(unknown) or '(none)'}",
                            "use inputs=noise,photos (or images=DIR)")
    check_threads(threads)
    if max_abs is not None and not (math.isfinite(max_abs) and max_abs >= 0):
        raise BadInputError(f"max_abs={max_abs} must be a finite number ≥ 0",
                            "e.g. max_abs=1e-4 (0 demands identical logits)")
    if num < 0:
        raise BadInputError(f"num={num} must be ≥ 0", "e.g. num=200 (0: all of images=)")
    if keep_rate is not None:
        check_keep_rate(keep_rate)
    if save_outputs is not None:
        check_output_path(Path(save_outputs), "save_outputs=")
    if Path(model).suffix in ENGINE_SUFFIXES:
        if precision != "f32":
            raise BadInputError(f"precision={precision!r} is OpenVINO's inference precision; "
                                f"{Path(model).name} is a TensorRT engine with its own",
                                "leave out precision=")
        if backend != "ort":
            raise BadInputError(f"{Path(model).name} is a TensorRT engine: it runs on TensorRT, not "
                                f"backend={backend!r}", "leave out backend=")
        if (against is None and load_outputs is None) or ckpt is not None or images is not None:
            raise BadInputError(f"{Path(model).name} is a TensorRT engine: it is checked against the "
                                "ONNX it was built from", "pass against=MODEL.onnx")
        return check_engine_against(model, against, batch_sizes=sizes, input_sets=sets or ["noise"],
                                    seed=seed, threads=threads, keep_rate=keep_rate,
                                    save_outputs=save_outputs, load_outputs=load_outputs)
    if isinstance(ckpt, Checkpoint) and ema:
        raise BadInputError("ema=True picks the weights when a checkpoint is read; this one is already "
                            "loaded", "load it with load_checkpoint(path, ema=True)")
    return check_onnx(model, ckpt_path=ckpt, against=against, ema=ema, batch_sizes=sizes,
                      input_sets=sets, seed=seed, threads=threads, images=images, num=num,
                      max_abs=max_abs, backend=backend, keep_rate=keep_rate, save_outputs=save_outputs,
                      load_outputs=load_outputs, precision=precision)


def lint(onnx: PathLike, *, expect_idle: bool = False) -> dict:
    """Static check that TensorRT 10/11 and TensorRT-RTX support every op and attribute of an ONNX
    file (`idle-export lint`); needs neither TensorRT nor a GPU. Returns the report: `passed`,
    `errors`, `warnings`, `findings` (rule, node, message) and the op counts. `expect_idle`
    makes a graph without the idle ops an error."""
    return lint_file(onnx, expect_idle=expect_idle)


def quantize(onnx: PathLike, output: PathLike | None = None, *, images: PathLike | None = None,
             num: int | None = None, method: str = "minmax", target: str = "ort",
             per_channel: bool = True, batch_size: int = 16, seed: int = 0, cache: bool = True,
             activations: str = "auto", weight_range: str = "auto", progress=None) -> dict:
    """Calibrate an FP32 ONNX file and write the INT8 Q/DQ model (`idle-export calibrate`); the
    token-selection path stays FP32.

    `images`: a folder, a .txt list or one image (default: the built-in photos); `num`: how many
    (default up to 512; 0: all); `method`: "minmax", "percentile" or "entropy"; `target`: "ort"
    (the fastest placement for ONNX Runtime), "trt" (for `build_engine(precision="int8")`) or
    "openvino" (NNCF, for OpenVINO; the `openvino` extra). `cache`: reuse preprocessed images
    from $IDLE_EXPORT_CACHE/calib; `progress(message)` is told each step. `activations`:
    "symmetric" (zero point 0) or "asymmetric" activation ranges; "auto" is the target's (ort
    asymmetric, trt and openvino symmetric; asymmetric for openvino is NNCF's MIXED preset).
    `weight_range`: "reduced" (7-bit weights, ONNX Runtime's reduce_range: exact on x86 CPUs
    without VNNI, where 8-bit u8×s8 products saturate, and as fast elsewhere), "full" (8-bit) or
    "auto", the target's (ort reduced, trt full; openvino takes only auto: NNCF's overflow fix).
    `output` defaults to MODEL.int8.TARGET.onnx. Returns the calibration report.
    """
    output = Path(output) if output is not None else default_int8_path(onnx, target)
    check_output_path(output, "output=")
    report = quantize_onnx(onnx, output, images=images, num=num, method=method, target=target,
                           per_channel=per_channel, batch_size=batch_size, seed=seed,
                           cache_dir=None if cache else False, status=progress, activations=activations,
                           weight_range=weight_range)
    report["openvino_ir"] = None
    if target == "openvino" and report.get("topk"):
        # INT8 GEMMs, OpenVINO's default (bf16 where the CPU has it) elsewhere, token scores in f32
        if progress:
            progress("writing the OpenVINO IR")
        report["openvino_ir"] = [str(p) for p in write_ir(output, fold=False)[:2]]
    return report


def bench(targets: Sequence[PathLike], *, backends: Sequence[str] = ("ort",),
          batches: Sequence[int] = (1, 8, 64), threads: int | None = None, runs: int = 5,
          warmup: int = 3, min_time: float = 1.0, inputs: str = "noise",
          scores: Sequence[str] = ("official", "folded"), optimize: bool = False,
          independent: bool = False, seed: int = 0, plot: PathLike | None = None,
          keep_rates: Sequence[float] | None = None, official_repo: PathLike | None = None,
          progress=None, on_pick=None) -> dict:
    """Images/s of idle vs dense, side by side, against the FLOP ideal (`idle-export bench`).

    `targets`: idle and dense ONNX files (paired by their metadata), engines, or one checkpoint
    (exported to a temporary folder in each of `scores`, with each backend's export target);
    none: the idle export in the current folder and its dense twin (exported from the checkpoint
    beside it when missing; `on_pick(line)` is told which). `backends`: names of `runtimes()`
    (ort, openvino, torch, trt …). Files are timed as written; `optimize` applies in memory the
    backend target's passes a file lacks. Each variant runs `runs` timed runs of at least
    `min_time` seconds, interleaved with the others;
    `independent` also times every ONNX file with timeit in a separate process.
    `plot` writes a PNG (the `plot` extra). `keep_rates` times each elastic file or engine once
    per rate (`bench --keep-rate`). `official_repo`: a clone of Ackesnal/IdleViT, for the
    torch-official backend. `progress(message)`: a context manager shown around each step.
    Returns the report (`report["results"]`: images/s, latency percentiles and achieved/ideal
    per variant and batch).
    """
    sizes = check_batch_sizes(batches, "batches", "1,8,64")
    if not (math.isfinite(min_time) and 0 < min_time <= 3600):
        raise BadInputError(f"min_time={min_time} must be a finite number > 0 and ≤ 3600", "e.g. min_time=1")
    if not 1 <= runs <= 1000 or not 1 <= warmup <= 1000:
        raise BadInputError(f"runs={runs} and warmup={warmup} must be between 1 and 1000",
                            "e.g. runs=5 warmup=3")
    check_threads(threads)
    modes = list(scores)
    for mode in modes or ["(none)"]:
        _check_scores(mode)
    if official_repo is not None and not Path(official_repo).is_dir():
        raise BadInputError(f"official_repo={official_repo} is not a folder",
                            "git clone https://github.com/Ackesnal/IdleViT and pass its path")
    if plot is not None:
        check_output_path(Path(plot), "plot=")
        require_matplotlib()  # exit 3 naming the extra before the benchmark, not after it
    if not targets:  # checked first: nothing is exported for a bench that cannot run
        targets, picked = default_targets(Path("."), status=progress)
        if on_pick:
            on_pick(picked)
    report = run_bench([Path(t) for t in targets], backends=list(backends), batches=sizes,
                       threads=threads, runs=runs, warmup=warmup, min_time=min_time, inputs=inputs,
                       score_modes=modes, optimize=optimize, independent=independent, seed=seed,
                       official_repo=None if official_repo is None else Path(official_repo), status=progress,
                       keep_rates=[check_keep_rate(r) for r in keep_rates] if keep_rates else None)
    if plot is not None:
        plot_report(report, Path(plot))
    return report


def open_model(model: PathLike, *, backend: str = "ort", threads: int | None = None,
               keep_rate: float | None = None) -> Runner:
    """A loaded model to run many times: an ONNX file on "ort" (ONNX Runtime CPU), "openvino" or
    another runtime of `runtimes()` that runs ONNX files, or a TensorRT engine (a GPU). Use it as
    a context manager; `infer({"images": x})` returns {"logits": …}. An elastic file takes a keep
    rate per call, `infer({"images": x, "keep_rate": 0.5})`, else `keep_rate` (default: the
    file's own rate).

        with api.open_model("deit_s_idle_elastic.onnx") as m:
            fast = m.infer({"images": x, "keep_rate": 0.5})["logits"]
            full = m.infer({"images": x, "keep_rate": 1.0})["logits"]
    """
    path = Path(model)
    if path.suffix in ENGINE_SUFFIXES:
        return registry.get(registry.ENGINE_RUNTIME).runner(path, keep_rate=keep_rate)  # checks at activate
    runtime = registry.get(backend, runs=registry.ONNX).require()
    return runtime.runner(path, threads=threads, keep_rate=keep_rate)


def runtimes() -> list[dict]:
    """The runtimes (`backend=` of check, bench, sweep and open_model), one dict each: name,
    what it runs ("onnx", "engine", "model"), the pip extra, the export target whose files suit
    it, its precisions, whether it reports kept tokens, whether it computes on the CPU, and
    `unavailable`: why it cannot run here (None when it can)."""
    return [{"name": r.name, "summary": r.summary, "runs": r.runs, "extra": r.extra, "target": r.target,
             "precisions": list(r.precisions), "selection": r.selection, "cpu": r.cpu,
             "unavailable": r.unavailable()} for r in registry.RUNTIMES.values()]


def demo(folder: PathLike = "demo_out", *, arch: str = "deit_small", keep: float = 0.7,
         batch_sizes: Sequence[int] = (1, 7, 32), progress=None) -> dict:
    """The whole pipeline on a seeded model (`idle-export demo`): a checkpoint in the official
    training format, its idle and dense ONNX exports, each checked against PyTorch. Returns the
    report; `report["passed"]` is the verdict and `report["checkpoint"]` the checkpoint's path.
    `progress(message)`: a context manager shown around each step."""
    return run_demo(Path(folder), arch=arch, keep_rate=keep, status=progress,
                    batch_sizes=check_batch_sizes(batch_sizes, "batch_sizes", "1,7,32"))
