"""The serving half of the public API (`idle_export.api` re-exports every name): Triton model
repositories and queries to a Triton server. Errors name the parameters as these functions
spell them (`instances=`); the CLI prints its flags instead."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from idle_export.api_export import PathLike
from idle_export.hardware import check_threads
from idle_export.serve.client import query
from idle_export.serve.repository import write_repository
from idle_export.serve.tune import tune_batching


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
        with (progress or (lambda m: contextlib.nullcontext()))(f"tuning {model.name}") as shown:
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
