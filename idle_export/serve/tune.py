"""`serve repo --tune`: a dynamic-batching config measured for this model on this machine.

The model runs on ONNX Runtime (CPU, the runtime `serve run` uses) at batch 1, 2, 4, … up to
max_batch, timed by bench's loop. From images/s per batch:
- preferred batch sizes: the smallest batch that reaches 90 % of the best images/s (past it,
  bigger batches add latency and little throughput) and the smallest that reaches 97 %;
- queue delay: 5 % of the batch-1 latency, 100 µs to 2 ms. Under load the queue fills while
  the model runs and batches form without waiting; the delay only gathers requests that arrive
  together at an idle model, and a lone request pays it in full, so it stays small;
- instances: enough ONNX Runtime sessions to use the cores (`cores // threads`: one session
  with intra-op threads = cores, the default, is one instance).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from idle_export.bench.timing import time_calls
from idle_export.errors import BadInputError
from idle_export.hardware import default_threads
from idle_export.onnx.io import INPUT_NAME, load_onnx_header
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.runtime import registry


def tune_batching(model: str | Path, max_batch: int, *, threads: int | None = None,
                  min_time: float = 0.4, progress=None) -> dict:
    """Measured images/s per batch and the config chosen from it (see the module's doc)."""
    model = Path(model)
    if model.suffix.lower() != ".onnx":
        raise BadInputError(f"tune=True times the model on ONNX Runtime (CPU); {model.name} is not an "
                            "ONNX file", "tune the ONNX file, or give preferred= / queue_delay_us= yourself")
    cores = default_threads()
    threads = threads or cores
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch] or [1]
    rates, latency_ms = {}, {}
    meta = OnnxMetadata.of(load_onnx_header(model))
    size = meta.spec.img_size if meta.has_spec else 224
    with registry.get(registry.ORT_CPU).runner(model, threads=threads) as runner:  # Triton's ORT
        for bs in sizes:
            if progress:
                progress(f"tuning: batch {bs}")
            x = np.random.default_rng(0).standard_normal((bs, 3, size, size)).astype(np.float32)
            feed = {INPUT_NAME: x}
            t0 = time.perf_counter()
            runner.infer(feed)  # warm-up, and the length of one call
            iters = max(2, int(min_time / max(time.perf_counter() - t0, 1e-4)))
            wall, _, lat = time_calls(runner, feed, iters)
            rates[bs] = bs * iters / wall
            latency_ms[bs] = float(np.median(lat) * 1e3)
    best = max(rates.values())
    knee = next(b for b in sizes if rates[b] >= 0.9 * best)
    full = next(b for b in sizes if rates[b] >= 0.97 * best)
    delay_us = int(min(2_000, max(100, round(latency_ms[1] * 1e3 * 0.05, -2))))
    return {"preferred": sorted({knee, full}), "queue_delay_us": delay_us,
            "instances": max(1, cores // threads), "threads": threads, "cores": cores,
            "images_per_second": {str(b): round(r, 2) for b, r in rates.items()},
            "latency_ms": {str(b): round(v, 2) for b, v in latency_ms.items()}}
