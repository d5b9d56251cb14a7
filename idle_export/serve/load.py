"""`serve bench`: a closed-loop load generator against any Triton server, what perf_analyzer's
concurrency mode does: C clients, each sending its next request as soon as the last is answered.

Per (model, batch, concurrency): a warm-up, then measurement windows (each at least 20 answers:
a slow model's windows grow, up to ten times `window_s`) until the last three agree within
`stability` (perf_analyzer's rule: 3 windows within 10 %) or `max_windows` pass. Reported
in perf_analyzer's field names where they exist (`Inferences/Second`, `p50 latency` … in µs,
`Server Queue`, `Server Compute Infer`: the server's own statistics over the measured windows,
from /v2/models/NAME/stats), plus images/s, errors and the windows themselves.

HTTP requests are made once per batch with tritonclient's own request encoder (binary tensors)
and sent by one `http.client` connection per client thread; gRPC uses tritonclient.grpc, one
client per thread. The generator runs in this process: on a small machine it competes with the
server for CPUs, so `cpu_load_generator` (its CPU seconds per measured second) is reported too.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.onnx.io import INPUT_NAME
from idle_export.serve.config import SERVE_PIP

PROTOCOLS = ("http", "grpc")
MIN_WINDOW_REQUESTS = 20


@dataclass
class Window:
    seconds: float
    latencies_us: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies_us) / self.seconds if self.seconds else 0.0


def _hostport(url: str, default_port: int) -> tuple[str, int]:
    m = re.fullmatch(r"(?:(?:https?|grpc)://)?([^/:]+|\[[^\]]+\])(?::(\d+))?/?", url.strip())
    if not m:
        raise BadInputError(f"URL {url!r} is not a server address", "e.g. http://127.0.0.1:8000")
    return m.group(1).strip("[]"), int(m.group(2) or default_port)


class _HttpSender:
    """One keep-alive connection; `send()` posts the prepared binary request, returns True on 200."""

    def __init__(self, host: str, port: int, path: str, body: bytes, json_size: int, timeout_s: float):
        import http.client

        self._conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self._path, self._body = path, body
        self._headers = {"Content-Type": "application/octet-stream",
                         "Inference-Header-Content-Length": str(json_size)}
        self.last_error = ""

    def send(self) -> bool:
        import http.client

        try:
            self._conn.request("POST", self._path, body=self._body, headers=self._headers)
            resp = self._conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            self.last_error = f"{type(e).__name__}: {e}"
            return False
        if resp.status != 200:
            self.last_error = f"HTTP {resp.status}: {data[:200].decode(errors='replace')}"
            return False
        return True

    def close(self) -> None:
        self._conn.close()


class _GrpcSender:
    def __init__(self, host: str, port: int, model: str, inputs, timeout_s: float):
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(f"{host}:{port}")
        self._model, self._inputs, self._timeout = model, inputs, timeout_s
        self.last_error = ""

    def send(self) -> bool:
        try:
            self._client.infer(self._model, self._inputs, client_timeout=self._timeout)
            return True
        except Exception as e:  # noqa: BLE001 - tritonclient's InferenceServerException and gRPC's
            self.last_error = " ".join(str(e).split())[:200]
            return False

    def close(self) -> None:
        self._client.close()


def _input_tensor(module, name: str, datatype: str, shape: list[int], seed: int):
    rng = np.random.default_rng(seed)
    dtype = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
             "UINT8": np.uint8}.get(datatype)
    if dtype is None:
        raise BadInputError(f"input {name!r} has type {datatype}, which serve bench does not generate",
                            "bench a model with FP32/FP16/integer inputs")
    tensor = module.InferInput(name, shape, datatype)
    data = (rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else
            rng.integers(0, 2, shape)).astype(dtype)
    tensor.set_data_from_numpy(data, **({"binary_data": True} if module.__name__.endswith("http") else {}))
    return tensor


def model_inputs(http_url: str, model: str, timeout_s: float) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, dims without the batch) of a served model's inputs, from its metadata."""
    import http.client

    host, port = _hostport(http_url, 8000)
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", f"/v2/models/{model}")
        resp = conn.getresponse()
        body = resp.read()
    except OSError as e:
        raise BadInputError(f"no Triton server answers at {http_url} ({type(e).__name__})",
                            "start one: idle-export serve run model_repository/ --port 8000") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise BadInputError(f"the server at {http_url} does not serve a model {model!r} (HTTP {resp.status})",
                            "name a served model with models= (GET /v2/models/NAME answers 200)")
    meta = json.loads(body)
    inputs = [(t["name"], t["datatype"], [int(d) for d in t["shape"][1:]]) for t in meta["inputs"]]
    # an idle-export model's images alone: its other inputs (an elastic file's keep_rate) are
    # optional and keep their defaults
    return [t for t in inputs if t[0] == INPUT_NAME] or inputs


def model_stats(http_url: str, model: str, timeout_s: float = 10.0) -> dict:
    """Triton's cumulative statistics of `model` (count and ns of each stage), summed over versions."""
    import http.client

    host, port = _hostport(http_url, 8000)
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", f"/v2/models/{model}/stats")
        doc = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    out = {"inference_count": 0, "execution_count": 0, "success": [0, 0], "queue": [0, 0],
           "compute_input": [0, 0], "compute_infer": [0, 0], "compute_output": [0, 0]}
    for version in doc.get("model_stats", []):
        out["inference_count"] += int(version.get("inference_count", 0))
        out["execution_count"] += int(version.get("execution_count", 0))
        stats = version.get("inference_stats", {})
        for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            out[key][0] += int(stats.get(key, {}).get("count", 0))
            out[key][1] += int(stats.get(key, {}).get("ns", 0))
    return out


def _stats_delta(before: dict, after: dict) -> dict:
    """perf_analyzer's server-side fields (µs per request) over the measured windows (all of
    them, from the first window's start to the last one's end)."""
    def avg_us(key):
        n = after[key][0] - before[key][0]
        return (after[key][1] - before[key][1]) / n / 1e3 if n else None

    return {"Server Inferences": after["inference_count"] - before["inference_count"],
            "Server Executions": after["execution_count"] - before["execution_count"],
            "Server Requests": after["success"][0] - before["success"][0],
            "Server Queue": avg_us("queue"), "Server Compute Input": avg_us("compute_input"),
            "Server Compute Infer": avg_us("compute_infer"),
            "Server Compute Output": avg_us("compute_output")}


def _stable(windows: list[Window], stability: float) -> bool:
    if len(windows) < 3:
        return False
    rates = [w.rate for w in windows[-3:]]
    mean = sum(rates) / 3
    return mean > 0 and all(abs(r - mean) <= stability * mean for r in rates)


def run_level(make_sender, concurrency: int, *, warmup_s: float, window_s: float, max_windows: int,
              stability: float, snapshot=lambda: None) -> tuple[list[Window], list[str], float, tuple]:
    """Closed loop at one concurrency: (measured windows, error samples, generator CPU s per s,
    `snapshot()` taken as the first window opens and as the last one closes)."""
    senders = [make_sender() for _ in range(concurrency)]
    windows: list[Window] = []
    lock = threading.Lock()
    state = {"window": None, "stop": False}
    errors: list[str] = []

    def client(sender):
        while not state["stop"]:
            t0 = time.perf_counter()
            ok = sender.send()
            dt = (time.perf_counter() - t0) * 1e6
            with lock:
                w = state["window"]
                if w is not None:
                    if ok:
                        w.latencies_us.append(dt)
                    else:
                        w.errors += 1
                if not ok and len(errors) < 5:
                    errors.append(sender.last_error)
            if not ok:
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in senders]
    for t in threads:
        t.start()
    try:
        time.sleep(warmup_s)
        first = snapshot()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        while len(windows) < max_windows:
            w = Window(0.0)
            with lock:
                state["window"] = w
            t0 = time.perf_counter()
            time.sleep(window_s)
            # a window counts at least MIN_WINDOW_REQUESTS answers (a slow model gets longer
            # windows, up to ten times --window), so three of them agreeing means something
            while (len(w.latencies_us) + w.errors < MIN_WINDOW_REQUESTS
                   and time.perf_counter() - t0 < 10 * window_s):
                time.sleep(window_s / 10)
            with lock:
                state["window"] = None
                w.seconds = time.perf_counter() - t0
            windows.append(w)
            if _stable(windows, stability):
                break
        last = snapshot()
        cpu = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    finally:
        state["stop"] = True
        for t in threads:
            t.join(timeout=30)
        for s in senders:
            s.close()
    return windows, errors, cpu, (first, last)


def _summary(windows: list[Window], batch: int) -> dict:
    """perf_analyzer's client-side fields over the last (up to three) windows."""
    used = windows[-3:]
    lat = np.array([x for w in used for x in w.latencies_us])
    seconds = sum(w.seconds for w in used)
    count = len(lat)
    pct = {f"p{p} latency": float(np.percentile(lat, p)) if count else None for p in (50, 90, 95, 99)}
    return {"Inferences/Second": count * batch / seconds if seconds else 0.0,
            "requests_per_second": count / seconds if seconds else 0.0,
            "images_per_second": count * batch / seconds if seconds else 0.0,
            "Avg latency": float(lat.mean()) if count else None, **pct,
            "requests": count, "errors": sum(w.errors for w in used),
            "measured_seconds": round(seconds, 3),
            "stable": len(windows) >= 3 and count > 0}


def bench_server(url: str, models: list[str], *, concurrency: list[int], batch: list[int],
                 protocol: str = "http", grpc_url: str | None = None, warmup_s: float = 1.0,
                 window_s: float = 2.0, max_windows: int = 8, stability: float = 0.1,
                 timeout_s: float = 60.0, seed: int = 0, progress=None) -> dict:
    """Closed-loop throughput and latency of each model at each batch and concurrency."""
    if protocol not in PROTOCOLS:
        raise BadInputError(f"protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}",
                            "use protocol=http or protocol=grpc")
    try:
        import tritonclient.http as httpclient
        grpcclient = None
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient
    except ImportError:
        raise MissingDependencyError(f"tritonclient[{protocol}] is not installed", SERVE_PIP) from None
    host, port = _hostport(url, 8000)
    ghost, gport = _hostport(grpc_url or f"{host}:8001", 8001)
    rows = []
    for model in models:
        specs = model_inputs(url, model, timeout_s)
        for bs in batch:
            if protocol == "http":
                tensors = [_input_tensor(httpclient, n, dt, [bs, *dims], seed) for n, dt, dims in specs]
                body, json_size = httpclient.InferenceServerClient.generate_request_body(tensors)
                json_size = json_size if json_size is not None else len(body)

                def make_sender(model=model, body=body, json_size=json_size):
                    return _HttpSender(host, port, f"/v2/models/{model}/infer", body, json_size, timeout_s)
            else:
                tensors = [_input_tensor(grpcclient, n, dt, [bs, *dims], seed) for n, dt, dims in specs]

                def make_sender(model=model, tensors=tensors):
                    return _GrpcSender(ghost, gport, model, tensors, timeout_s)
            for c in concurrency:
                if progress:
                    progress(f"{model}: batch {bs}, concurrency {c}")
                windows, errors, cpu, (before, after) = run_level(
                    make_sender, c, warmup_s=warmup_s, window_s=window_s, max_windows=max_windows,
                    stability=stability, snapshot=lambda model=model: model_stats(url, model, timeout_s))
                row = {"model": model, "batch": bs, "Concurrency": c, **_summary(windows, bs),
                       "requests_all_windows": sum(len(w.latencies_us) for w in windows),
                       **_stats_delta(before, after), "cpu_load_generator": round(cpu, 3),
                       "windows": [{"seconds": round(w.seconds, 3), "requests": len(w.latencies_us),
                                    "errors": w.errors} for w in windows]}
                if errors:
                    row["error_samples"] = errors
                rows.append(row)
    return {"url": url, "protocol": protocol, "models": models, "rows": rows,
            "settings": {"warmup_s": warmup_s, "window_s": window_s, "max_windows": max_windows,
                         "stability": stability, "seed": seed},
            "ratios": idle_dense_ratios(rows, models)}


def idle_dense_ratios(rows: list[dict], models: list[str]) -> list[dict]:
    """Throughput of the first model over the second at each (batch, concurrency) both ran."""
    if len(models) < 2:
        return []
    a, b = models[0], models[1]
    by = {(r["model"], r["batch"], r["Concurrency"]): r for r in rows}
    out = []
    for (m, bs, c), row in sorted(by.items()):
        other = by.get((b, bs, c))
        if m == a and other and other["images_per_second"]:
            out.append({"batch": bs, "Concurrency": c, "models": f"{a}/{b}",
                        "throughput_ratio": row["images_per_second"] / other["images_per_second"]})
    return out
