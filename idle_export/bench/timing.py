"""The one timing loop of the project: warm-up, interleaved runs, images/s per run, latency
percentiles and process CPU time (bench, sweep and anything else that times a runner)."""

from __future__ import annotations

import time

import numpy as np

from idle_export.bench.variants import Variant
from idle_export.runtime import registry


def on_cpu(backend: str) -> bool:
    """Whether the backend computes on the CPU (runtime.registry): for those the process CPU time
    per image is reported too. On a shared machine it moves far less than wall time (other
    processes' work is not counted); with one thread it is the work done, with more it also
    counts the runtime's spinning threads."""
    return registry.get(backend).cpu


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
        if getattr(v.runner, "static_batch", False):
            v.runner.infer(feed)  # may compile the model for this batch size: not a warm-up call
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
        if progress:  # one line per run (all variants), each at least --min-time per variant
            progress(f"batch {batch}: run {r + 1}/{runs}")
        for v in order:
            wall, cpu, lat = time_calls(v.runner, feed, iters[v.key])
            walls[v.key].append(wall)
            cpus[v.key].append(cpu)
            lats[v.key].extend(lat)
    for v in variants:
        v.results[batch] = summarise(batch, walls[v.key], [iters[v.key]] * runs, lats[v.key],
                                     cpus[v.key] if on_cpu(v.backend) else None)
