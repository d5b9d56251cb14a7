"""The serving half of the public API (`idle_export.api` re-exports every name): Triton model
repositories, a local server, queries and load on a Triton server. Errors name the parameters
as these functions spell them (`instances=`); the CLI prints its flags instead."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from idle_export.api_export import PathLike, _no_progress
from idle_export.errors import BadInputError
from idle_export.fileio import check_output_path
from idle_export.hardware import check_threads
from idle_export.onnx.io import check_batch_sizes
from idle_export.serve.client import query
from idle_export.serve.load import bench_server
from idle_export.serve.load_plot import plot_load
from idle_export.serve.repository import write_repository
from idle_export.serve.server import serve_repository
from idle_export.serve.tune import tune_batching

MAX_CONCURRENCY = 256


def serve_repo(model: PathLike, output: PathLike = "model_repository", *, name: str | None = None,
               max_batch: int | None = None, preferred: Sequence[int] | None = None,
               queue_delay_us: int | None = None, instances: int | None = None, tune: bool = False,
               threads: int | None = None, kind: str | None = None, version: int = 1,
               onnx: PathLike | None = None, force: bool = False, accelerator: str | None = None,
               accelerator_precision: str = "fp16", progress=None) -> dict:
    """Write a Triton model repository (`idle-export serve repo`): OUTPUT/NAME/config.pbtxt,
    NAME/VERSION/model.onnx (onnxruntime_onnx) or model.plan (a TensorRT engine with its .json
    sidecar; `onnx`: the ONNX it was built from), and the labels.

    `name` defaults to the file's stem; `max_batch` to 64 (an engine: its profile's max);
    `preferred` (the dynamic batcher's sizes) to MAX/2,MAX; `queue_delay_us` to 100;
    `instances` to 1; `kind` "auto", "cpu" or "gpu". `tune` times the ONNX model on ONNX
    Runtime here (`threads`) and chooses preferred sizes, queue delay and instances for this
    CPU; the values given still win. A model folder that exists gets `version` beside its other
    versions; `force` replaces that version. `accelerator`: "tensorrt" (Triton's ONNX Runtime
    backend builds an engine on the serving GPU, `accelerator_precision` fp16|fp32) or
    "openvino" (CPU). `progress(message)`: a context manager around the tuning.
    Returns the report (folder, platform, batching, files, `warnings`, `tuned`: the measurements
    of `tune`, else None).
    """
    model = Path(model)
    sizes = None if preferred is None else [int(b) for b in preferred]
    tuned = None
    if tune:
        threads = check_threads(threads)
        with (progress or _no_progress)(f"tuning {model.name}") as shown:
            tuned = tune_batching(model, max_batch or 64, threads=threads,
                                  progress=getattr(shown, "update", None))
        sizes = sizes or tuned["preferred"]
        queue_delay_us = tuned["queue_delay_us"] if queue_delay_us is None else queue_delay_us
        instances = tuned["instances"] if instances is None else instances
    report = write_repository(model, output, name=name, max_batch=max_batch, preferred=sizes,
                              queue_delay_us=100 if queue_delay_us is None else queue_delay_us,
                              instances=1 if instances is None else instances, kind=kind,
                              version=version, onnx=onnx, force=force, accelerator=accelerator,
                              accelerator_precision=accelerator_precision)
    return {**report, "tuned": tuned}


def serve_query(url: str, images: Sequence[PathLike], *, model: str | None = None, top: int = 5,
                repeat: int = 1, timeout: float = 60.0, wait: float = 0.0,
                keep_rate: float | None = None) -> dict:
    """Top-k classes of each image and the request latency from a Triton server (KServe v2 HTTP;
    `idle-export serve query`), preprocessed as `check` does. `model`: the model name (default:
    the only one ready); `repeat` sends the request that many times (latency percentiles);
    `timeout`: the network timeout in seconds; `wait`: seconds to wait for a server that is
    still starting; `keep_rate`: sent to an elastic model with each request. Needs the `serve`
    extra (tritonclient). Returns the report (`results`: top classes per image, `latency_ms`)."""
    return query(url, list(images), model=model, top=top, repeat=repeat, timeout_s=timeout, wait_s=wait,
                 keep_rate=keep_rate)


def serve_run(repository: PathLike, *, host: str = "127.0.0.1", port: int = 8000,
              models: Sequence[str] | None = None, threads: int | None = None, grpc_port: int | None = None,
              metrics_port: int | None = None, exit_timeout: int = 10, log_file: PathLike | None = None,
              max_input_bytes: int | None = None, in_flight_bytes: int | None = None,
              on_start: Callable[[], None] | None = None, on_ready: Callable | None = None,
              stop_event: threading.Event | None = None) -> dict:
    """Serve a repository's ONNX models locally (`idle-export serve run`): Triton core via
    pytriton, ONNX Runtime on the CPU, until SIGINT/SIGTERM (or `stop_event`). `models`: only
    these (default all); `grpc_port`, `metrics_port`: also serve gRPC / Prometheus metrics;
    `exit_timeout`: seconds (0-25) for the requests accepted before a stop; `log_file` keeps
    tritonserver's log; `max_input_bytes`: the most bytes of inputs one HTTP request may declare
    (default 64 MiB or a served model's full batch); `in_flight_bytes`: the most bytes of request
    bodies held at once. `on_start()` is called as the server starts, `on_ready(handle)` once it
    serves (handle: `url`, `models`, `warnings`, `max_input_bytes`). Needs the `serve` extra.
    Returns the summary: `skipped` models, `signal`, `uptime_s`, `shutdown_s`."""
    return serve_repository(repository, host=host, port=port, models=list(models) if models else None,
                            threads=check_threads(threads), grpc_port=grpc_port, metrics_port=metrics_port,
                            exit_timeout_s=exit_timeout, log_file=log_file, max_input_bytes=max_input_bytes,
                            in_flight_bytes=in_flight_bytes, on_start=on_start, on_ready=on_ready,
                            stop_event=stop_event, handle_signals=stop_event is None)


def serve_bench(url: str, models: Sequence[str], *, concurrency: Sequence[int] = (1, 2, 4, 8),
                batches: Sequence[int] = (1, 8), protocol: str = "http", grpc_url: str | None = None,
                warmup: float = 1.0, window: float = 2.0, max_windows: int = 8, stability: float = 0.1,
                timeout: float = 60.0, plot: PathLike | None = None, progress=None) -> dict:
    """Closed-loop load on a Triton server (`idle-export serve bench`): images/s and p50/p90/p99
    latency of each model at each batch size and concurrency (clients in flight at once), the
    first two models compared. `protocol`: "http" (binary tensors) or "grpc" (`grpc_url`, default
    the HTTP host, port 8001); `warmup` seconds of load before measuring, windows of `window`
    seconds until three agree within `stability` (at most `max_windows`); `timeout` per request.
    `plot`: a PNG of throughput and p99 latency against concurrency (the `plot` extra);
    `progress(message)`: a context manager around the load. Needs the `serve` extra.
    Returns the report: `rows` (one per model, batch and concurrency), `ratios`."""
    names = [m for m in models if m]
    if not names:
        raise BadInputError("models= names no model", "e.g. models=deit_s_idle,deit_s_dense")
    levels = [int(c) for c in concurrency]
    if not levels or min(levels) < 1 or max(levels) > MAX_CONCURRENCY:
        raise BadInputError(f"concurrency={','.join(map(str, levels))} needs levels between 1 and "
                            f"{MAX_CONCURRENCY}", "e.g. concurrency=1,2,4,8")
    sizes = check_batch_sizes(batches, "batches", "1,8")
    for value, what in ((warmup, "warmup"), (window, "window"), (timeout, "timeout")):
        if not (math.isfinite(value) and 0 <= value <= 3600) or (what != "warmup" and value == 0):
            raise BadInputError(f"{what}={value} must be a number of seconds in (0, 3600]", f"e.g. {what}=2")
    if not 3 <= max_windows <= 100:
        raise BadInputError(f"max_windows={max_windows} must be between 3 and 100", "e.g. max_windows=8")
    if not 0 < stability < 1:
        raise BadInputError(f"stability={stability} must lie in (0, 1)", "e.g. stability=0.1")
    if plot is not None:
        check_output_path(Path(plot), "plot=")
    with (progress or _no_progress)(f"load on {url}") as shown:
        report = bench_server(url, names, concurrency=levels, batch=sizes, protocol=protocol,
                              grpc_url=grpc_url, warmup_s=warmup, window_s=window, max_windows=max_windows,
                              stability=stability, timeout_s=timeout, progress=getattr(shown, "update", None))
    if plot is not None:
        plot_load(report, Path(plot))
    return report
