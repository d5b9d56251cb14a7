"""Serving an elastic file (`onnx --elastic`): `keep_rate` as an optional request input, and
requests at different rates never in one batch.

Triton's dynamic batcher concatenates requests along the batch dimension, but one ONNX run has one
keep_rate: a batch mixing rates would run every image at one of them. So an elastic model is
written without the dynamic batcher (max_batch_size 0): a request is the batch its client sent
(images [-1, 3, H, W]) and carries its own `keep_rate` (FP32 [1], reshaped to the graph's scalar;
optional: the file's default rate when absent). This holds in any Triton (the stock server's
ONNX Runtime backend runs each request as it came) and in `serve run`, which binds such a model
unbatched and runs each request alone (`run_requests`).
"""

from __future__ import annotations

import numpy as np

from idle_export.errors import BadInputError
from idle_export.model.config import check_keep_rate
from idle_export.onnx.elastic import KEEP_RATE_INPUT
from idle_export.serve.config import RepoConfig, TensorConfig


def serve_elastic(cfg: RepoConfig, meta, engine_info: dict, warnings: list[str]) -> bool:
    """For an elastic ONNX file: its served form (make_unbatched_elastic), True. An engine built
    with `trt --elastic` (its keep_permille shape input) is refused; an engine built without it
    runs at the file's default rate and is served as it is (False)."""
    if meta.elastic is None:
        return False
    if engine_info:
        if engine_info.get("elastic"):
            raise BadInputError("an elastic engine (`trt --elastic`, shape input keep_permille) is not "
                                "served by this repository writer",
                                "serve the elastic ONNX file (keep_rate per request), or an engine "
                                "built without `idle-export trt --elastic` (fixed at the file's default "
                                "rate)")
        return False
    warnings += make_unbatched_elastic(cfg, meta.elastic["default"])
    return True


def make_unbatched_elastic(cfg: RepoConfig, default_rate: float) -> list[str]:
    """Turn the batched config of an elastic file into its served form (in place): no dynamic
    batcher, the batch dimension in the tensors' dims, and the optional keep_rate input. Returns
    the warnings for the report."""
    for t in [*cfg.inputs, *cfg.outputs]:
        t.dims = [-1, *t.dims]
    cfg.inputs.append(TensorConfig(KEEP_RATE_INPUT, "TYPE_FP32", [1], optional=True, reshape=[]))
    batch = cfg.max_batch_size
    cfg.max_batch_size = 0
    cfg.preferred_batch_sizes, cfg.max_queue_delay_us = [], 0
    return [f"elastic model: served without the dynamic batcher (max_batch_size 0; --max-batch {batch} "
            f"and the preferred sizes do not apply), so requests at different keep rates never share a "
            f"batch; each request runs the images it sends at its keep_rate (default {default_rate:g})"]


def is_unbatched_elastic(config) -> bool:
    """Whether a parsed ModelConfig is the served form of an elastic file."""
    return config.max_batch_size == 0 and any(t.name == KEEP_RATE_INPUT for t in config.input)


def run_requests(model, requests) -> list[dict]:
    """pytriton's infer function for an unbatched elastic model: each request alone, at its own
    rate (`model(**inputs)` is the ONNX Runtime session of serve.server._OrtModel)."""
    return [model(**{name: np.asarray(value) for name, value in request.items()}) for request in requests]


def rate_feed(inputs: dict) -> dict:
    """The ONNX feed for a request's inputs: keep_rate FP32 [1] → the graph's scalar (checked in
    (0, 1]); dropped when absent, so the file's default applies."""
    feed = dict(inputs)
    if KEEP_RATE_INPUT in feed:
        value = np.asarray(feed[KEEP_RATE_INPUT], dtype=np.float32).reshape(-1)
        if value.size != 1:
            raise BadInputError(f"keep_rate must be one value per request, got {value.size}",
                                "send keep_rate as FP32 [1]")
        feed[KEEP_RATE_INPUT] = np.asarray(check_keep_rate(float(value[0])), dtype=np.float32)
    return feed
