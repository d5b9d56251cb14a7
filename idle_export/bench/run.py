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
import os
from pathlib import Path

import numpy as np

from idle_export.bench.independent import independent_checks
from idle_export.bench.report import build_report
from idle_export.bench.targets import resolve_targets
from idle_export.bench.timing import bench_batch
from idle_export.bench.variants import flop_model, make_variants
from idle_export.data.inputs import input_set
from idle_export.errors import BadInputError
from idle_export.hardware import check_batch_fits, default_threads, environment
from idle_export.onnx.io import check_batch_sizes
from idle_export.onnx.targets import TARGET_PASSES
from idle_export.runtime import registry
from idle_export.runtime.onnxruntime import X64_QUANT_PRECISION

DEFAULT_BATCHES = (1, 8, 64)


# ----------------------------------------------------------------------------- main entry
def run_bench(paths: list[Path], *, backends: list[str], batches: list[int], threads: int | None = None,
              runs: int = 5, warmup: int = 3, min_time: float = 1.0, inputs: str = "noise",
              score_modes: list[str] | None = None, optimize: bool = False,
              official_repo: Path | None = None, independent: bool = False, ema: bool = False,
              seed: int = 0, status=None, workdir: Path | None = None,
              keep_rates: list[float] | None = None) -> dict:
    """Benchmark idle vs dense (and the official code) on every backend; the JSON report.

    ONNX files are timed as written (their export target's passes, `report["results"][i]
    ["passes_in_file"]`); optimize=True applies, in memory, the backend's target passes that a
    file lacks (`passes_at_load`). A checkpoint is exported with each backend's target.
    keep_rates: an elastic file (`onnx --elastic`) is timed once per rate, in the same interleaving."""
    import shutil
    import tempfile

    status = status or (lambda msg: contextlib.nullcontext())
    score_modes = score_modes or ["official"]
    batches = list(dict.fromkeys(check_batch_sizes(batches, "batches", "1,8,64")))
    if runs < 1 or warmup < 0 or min_time <= 0:
        raise BadInputError("runs= must be ≥ 1, warmup= ≥ 0, min_time= > 0", "e.g. runs=5 warmup=3")
    if inputs not in ("noise", "photos"):
        raise BadInputError(f"inputs={inputs!r} is not noise or photos", "use inputs=noise")
    if not backends:
        raise BadInputError("no backend given", f"use one or more of {registry.choices()}")
    runtimes = [registry.get(b) for b in backends]  # exit 2 on a name that is not one
    threads = threads or default_threads()
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="idle-export-bench-")) if own_tmp else Path(workdir)
    try:
        targets = resolve_targets(paths, backends=backends, score_modes=score_modes, workdir=workdir,
                                  ema=ema, status=status)
        spec = targets.spec
        check_batch_fits(spec, max(batches), what="batches=", runners=max(2, len(backends) * 2))
        flops = flop_model(spec)
        env = environment(threads)
        if registry.ORT_CPU in backends:  # what its figures ran with, besides the file (INT8 products)
            env["onnxruntime_session_config"] = dict([X64_QUANT_PRECISION])
        if targets.engines and not any(r.runs == registry.ENGINE for r in runtimes):
            backends = [*backends, *registry.names(registry.ENGINE)]  # never measure nothing
        variants = make_variants(targets, backends, threads=threads, score_modes=score_modes,
                                 optimize=optimize, official_repo=official_repo, keep_rates=keep_rates)
        if not variants:
            raise BadInputError(f"nothing to measure: no target runs on {', '.join(backends)}",
                                "pass idle and dense ONNX files (or a checkpoint) for backends=ort")
        _set_torch_threads(backends, threads)
        with contextlib.ExitStack() as stack:
            for v in variants:
                with status(f"loading {v.key}"):
                    runner = v.make_runner()
                    runner.static_batch = True  # each runtime's best setting (OpenVINO: static shapes)
                    v.runner = stack.enter_context(runner)
            targets.loaded.clear()  # files no runner took (another runtime's): not kept in memory
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

        report = build_report(spec, flops, env, variants, batches, targets,
                              settings=dict(batch=batches, backends=backends, runs=runs,
                                            warmup=max(warmup, 1), min_time_s=min_time, threads=threads,
                                            inputs=inputs, seed=seed, optimize=optimize,
                                            passes={r.name: list(TARGET_PASSES[r.target])
                                                    for r in runtimes if r.runs == registry.ONNX}
                                            if optimize else {},
                                            score_modes=score_modes, keep_rates=keep_rates or [],
                                            static_batch=True))
        report["notes"] = graph_notes(variants, optimize)
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


def graph_notes(variants, optimize: bool) -> list[str]:
    """What a reader of the figures must know about the graphs timed: a backend whose idle and
    dense graphs carry different passes (an unfair pair), and files timed without the passes of
    the backend's own export target."""
    notes = []
    for backend in dict.fromkeys(v.backend for v in variants if v.file):
        group = [v for v in variants if v.backend == backend and v.file and v.precision == "fp32"]
        passes = {tuple(sorted(v.file_passes + v.passes_at_load)) for v in group}
        if len(passes) > 1:
            notes.append(f"{backend}: the idle and dense graphs carry different passes ("
                         + "; ".join(f"{v.label}: {', '.join(v.file_passes + v.passes_at_load) or 'none'}"
                                     for v in group) + "): export both with the same --target")
        target = registry.get(backend).target
        lacking = [v for v in group
                   if target and set(TARGET_PASSES[target]) - set(v.file_passes + v.passes_at_load)]
        if lacking and not optimize:
            notes.append(f"{backend}: {', '.join(Path(v.file).name for v in lacking)} timed without the "
                         f"{target} target's passes (export with `idle-export onnx CKPT --target {target}`, "
                         "or apply them in memory: bench --optimize, api.bench(optimize=True))")
    return notes


def _set_torch_threads(backends: list[str], threads: int) -> None:
    if any(registry.get(b).runs == registry.MODEL for b in backends):
        import torch

        torch.set_num_threads(threads)


