"""`query(url, images)`: image files preprocessed exactly like `check` (timm eval transform), sent
to any Triton server (KServe v2 HTTP); top-k classes and request latency."""

from __future__ import annotations

import math
import re
import shlex
import time
from pathlib import Path

import numpy as np

from idle_export.data.images import open_rgb
from idle_export.data.inputs import eval_transform
from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.model.config import IMAGENET_MEAN, IMAGENET_STD, check_keep_rate
from idle_export.onnx.elastic import KEEP_RATE_INPUT
from idle_export.serve.config import SERVE_PIP, metadata_from_parameters

MAX_WAIT_S = 3600
WAIT_POLL_S = 0.5


# ============================================================================ client
def _client(url: str, timeout_s: float):
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise MissingDependencyError("tritonclient[http] is not installed", SERVE_PIP) from None
    text = url.strip()
    ssl = text.startswith("https://")
    hostport = re.sub(r"^https?://", "", text).rstrip("/")
    if not hostport or "/" in hostport:
        raise BadInputError(f"URL {url!r} is not a server address", "e.g. http://127.0.0.1:8000")
    return httpclient.InferenceServerClient(hostport, ssl=ssl, connection_timeout=timeout_s,
                                            network_timeout=timeout_s)


def _server_error(e) -> str:
    msg = getattr(e, "message", None)
    msg = msg() if callable(msg) else (msg or str(e))
    return " ".join(str(msg).split())[:300]


def load_images(paths: list[str | Path]):
    """PIL RGB images, decoded the way `check --images` and `calibrate` decode them
    (data.images.open_rgb: 16/32-bit grayscale scaled, not clipped; images over its pixel limit
    refused); one-line errors for folders, missing files and bytes that are not an image."""
    from PIL import UnidentifiedImageError

    images = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            raise BadInputError(f"{p} is a folder, not an image",
                                f"pass image files, e.g. {shlex.quote(str(p))}/*.jpg")
        if not p.is_file():
            raise BadInputError(f"image not found: {p}", "check the path")
        try:
            images.append(open_rgb(p)[0])
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise BadInputError(f"{p.name} is not an image this tool can read ({type(e).__name__})",
                                "pass a JPEG, PNG, WebP, BMP or TIFF file") from None
    return images


def _spec_from_parameters(params: dict[str, str], dims: list[int]):
    """ModelSpec from the served idle_export.* parameters, else DeiT defaults for the input size."""
    from types import SimpleNamespace

    try:
        return metadata_from_parameters(params).spec, None
    except (BadInputError, ValueError, TypeError, KeyError):
        size = int(dims[-1]) if dims else 224
        return (SimpleNamespace(img_size=size, crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_MEAN,
                                std=IMAGENET_STD),
                "the served model has no idle-export metadata: DeiT preprocessing assumed "
                "(bicubic, crop 0.875, ImageNet mean/std)")


def query(url: str, images: list[str | Path], *, model: str | None = None, top: int = 5, repeat: int = 1,
          timeout_s: float = 60.0, wait_s: float = 0.0, keep_rate: float | None = None) -> dict:
    """Top-k classes of each image and request latency from a Triton server (KServe v2 HTTP);
    `wait_s`: how long to wait for a server that is still starting to be ready; keep_rate: sent
    as the elastic model's keep_rate input (serve.elastic)."""
    if top < 1:
        raise BadInputError(f"top={top} must be at least 1", "e.g. top=5")
    if repeat < 1:
        raise BadInputError(f"repeat={repeat} must be at least 1", "e.g. repeat=20")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise BadInputError(f"timeout={timeout_s:g} must be a number of seconds above 0",
                            "e.g. timeout=60")
    if not (math.isfinite(wait_s) and 0 <= wait_s <= MAX_WAIT_S):
        raise BadInputError(f"wait={wait_s:g} must be a number of seconds from 0 to {MAX_WAIT_S}",
                            "e.g. wait=60")
    if not images:
        raise BadInputError("no image given", "pass one or more image files")
    if keep_rate is not None:
        keep_rate = check_keep_rate(keep_rate)
    pil = load_images(images)
    client = _client(url, timeout_s)  # exit 3 naming the serve extra when tritonclient is missing
    from tritonclient.utils import InferenceServerException

    try:
        _wait_ready(client, url, wait_s)
        name = model or _only_model(client, url)
        try:
            cfg = client.get_model_config(name)
        except InferenceServerException as e:
            raise BadInputError(f"model {name!r}: {_server_error(e)}", "check model=") from None
        inp, out = cfg["input"][0], cfg["output"][0]
        if keep_rate is not None and KEEP_RATE_INPUT not in [t["name"] for t in cfg["input"]]:
            raise BadInputError(f"model {name} has no keep_rate input: it is not an elastic export",
                                "serve a file written by `idle-export onnx --elastic`, or drop keep_rate=")
        if inp.get("data_type") != "TYPE_FP32":
            raise BadInputError(f"model {name} takes {inp.get('data_type')}, not an FP32 image",
                                "query a model written by `idle-export serve repo`")
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        spec, warning = _spec_from_parameters(params, inp.get("dims", []))
        classes = metadata_from_parameters(params).classes
        transform = eval_transform(spec)
        x = np.stack([transform(img).numpy() for img in pil]).astype(np.float32)
        max_batch = int(cfg.get("max_batch_size", 0)) or len(pil)
        latencies, logits = [], None
        import tritonclient.http as httpclient

        for _ in range(repeat):
            chunks = []
            for start in range(0, len(x), max_batch):
                part = x[start:start + max_batch]
                tensor = httpclient.InferInput(inp["name"], list(part.shape), "FP32")
                tensor.set_data_from_numpy(part)
                sent = [tensor]
                if keep_rate is not None:  # one rate per request (serve.elastic)
                    rate = httpclient.InferInput(KEEP_RATE_INPUT, [1], "FP32")
                    rate.set_data_from_numpy(np.asarray([keep_rate], dtype=np.float32))
                    sent.append(rate)
                t0 = time.perf_counter()
                try:
                    res = client.infer(name, sent, outputs=[httpclient.InferRequestedOutput(out["name"])])
                except InferenceServerException as e:
                    raise BadInputError(f"the server refused the request: {_server_error(e)}",
                                        "check the model's input shape") from None
                latencies.append((time.perf_counter() - t0) * 1e3)
                chunks.append(res.as_numpy(out["name"]))
            logits = np.concatenate(chunks)
    finally:
        client.close()
    return {"url": url, "model": name, "images": [str(p) for p in images],
            "results": topk_report(logits, classes, top, [str(p) for p in images]),
            "latency_ms": _latency(latencies), "requests": len(latencies), "keep_rate": keep_rate,
            "warnings": [warning] if warning else []}


def _wait_ready(client, url: str, wait_s: float) -> None:
    """Return once the server says it is ready (/v2/health/ready), asking every half second for
    up to `wait_s` seconds (0: once); else the one-line error."""
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + wait_s
    while True:
        try:
            ready, why = client.is_server_ready(), ""
        except InferenceServerException as e:
            ready, why = False, _server_error(e)
        except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts
            ready, why = False, type(e).__name__
        left = deadline - time.monotonic()
        if ready or left <= 0:
            break
        time.sleep(min(WAIT_POLL_S, left))
    if not ready:
        waited = f" after waiting {wait_s:g} s" if wait_s else ""
        what = f"no Triton server answers at {url} ({why})" if why else \
            f"the Triton server at {url} is not ready"
        hint = "start one with `idle-export serve run model_repository/ --port 8000`; " + (
            "one still loading its models: pass a longer wait=" if wait_s else
            "one that is starting: pass wait=60 to wait until it is ready")
        raise BadInputError(what + waited, hint)


def _only_model(client, url: str) -> str:
    """The one model the server has ready: from the repository index (a stock Triton), else from
    the statistics of loaded models (pytriton loads models from outside its repository)."""
    from tritonclient.utils import InferenceServerException

    names: list[str] = []
    errors = []
    try:
        names = [m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"]
    except InferenceServerException as e:
        errors.append(_server_error(e))
    if not names:
        try:
            names = [m["name"] for m in client.get_inference_statistics().get("model_stats", [])]
        except InferenceServerException as e:
            errors.append(_server_error(e))
    names = sorted(set(names))
    if len(names) != 1:
        why = f" ({'; '.join(errors)})" if errors else ""
        raise BadInputError(f"{len(names)} models ready at {url}: {', '.join(names) or '(none)'}{why}",
                            "pass model=NAME")
    return names[0]


def topk_report(logits: np.ndarray, classes: list[str] | None, top: int, names: list[str]) -> list[dict]:
    logits = np.asarray(logits, dtype=np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(top, logits.shape[1])
    rows = []
    for i, name in enumerate(names):
        order = np.argsort(-logits[i], kind="stable")[:k]
        rows.append({"image": name, "top": [
            {"index": int(c), "label": classes[c] if classes and c < len(classes) else None,
             "logit": float(logits[i, c]), "prob": float(prob[i, c])} for c in order]})
    return rows


def _latency(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max())}
