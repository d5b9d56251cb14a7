"""`serve_repository(repo)`: serve the ONNX models of a repository on this machine with
nvidia-pytriton (the real Triton core and its dynamic batcher; inference by ONNX Runtime on the
CPU), HTTP on 127.0.0.1 by default; stops cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idle_export.errors import BadInputError, IdleExportError, MissingDependencyError
from idle_export.fileio import check_output_path
from idle_export.runtime import registry
from idle_export.serve.config import ONNX_PLATFORM, SERVE_PIP, TRITON_TO_NUMPY, model_config_pb2
from idle_export.serve.elastic import is_unbatched_elastic, rate_feed, run_requests
from idle_export.serve.guard import DEFAULT_MAX_INPUT, ELEMENT_BYTES, Guard
from idle_export.serve.process import LOG_NOISE, Drain, crash_cause, process_tree, stop_leftovers
from idle_export.serve.reader import RepoModel, read_repository

# Endpoints that need pytriton's access token. model-repository (the model index the client uses)
# and statistics (request counts) stay open, as in a stock Triton; the server binds 127.0.0.1.
RESTRICTED_ENDPOINTS = ["shared-memory", "trace", "logging"]
# pytriton kills tritonserver 30 s after asking it to stop (SERVER_OUTPUT_TIMEOUT_SECS): a longer
# exit timeout would be cut short, with the in-flight requests.
MAX_EXIT_TIMEOUT_S = 25
MAX_INPUT_BOUNDS = (4096, 2**31)  # --http-max-input-size


def python_lib_dir() -> str:
    """The folder with libpythonX.Y.so, which pytriton's Python-backend stub needs at run time."""
    return sysconfig.get_config_var("LIBDIR") or os.path.join(sys.base_prefix, "lib")


def fix_library_path(env: dict | None = None) -> bool:
    """Put this Python's lib dir on LD_LIBRARY_PATH (in os.environ unless `env` is given).

    tritonserver and its Python-backend stub are started by pytriton with a copy of os.environ,
    so setting it in-process before the start is enough; no re-exec needed. True when changed.
    """
    env = os.environ if env is None else env
    libdir = python_lib_dir()
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir in parts:
        return False
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    return True


def check_port_free(host: str, port: int, what: str = "port=") -> None:
    """BadInputError when something already listens on host:port."""
    if not 0 < port < 65536:
        raise BadInputError(f"{what}{port} is not a TCP port", f"use {what}8000")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except PermissionError:
            raise BadInputError(f"no permission to listen on {host}:{port}",
                                f"use a port above 1023, e.g. {what}8000") from None
        except OSError as e:
            if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                raise BadInputError(f"port {port} on {host} is already in use (another server?)",
                                    f"stop that server or pick a free port, e.g. {what}{port + 10}"
                                    ) from None
            raise BadInputError(f"cannot listen on {host}:{port} ({e.strerror})",
                                "check host= (e.g. 127.0.0.1)") from None


def check_run_options(exit_timeout_s: int, log_file: str | Path | None,
                      max_input_bytes: int | None = None) -> Path | None:
    """Usage errors of `serve run` before anything starts; the log file as an absolute path."""
    lo, hi = MAX_INPUT_BOUNDS
    if max_input_bytes is not None and not lo <= max_input_bytes <= hi:
        raise BadInputError(f"max_input_bytes={max_input_bytes} must lie in {lo}..{hi} bytes",
                            "e.g. max_input_bytes=67108864 (64 MiB, the default, or a served model's full "
                            "batch)")
    if not 0 <= exit_timeout_s <= MAX_EXIT_TIMEOUT_S:
        raise BadInputError(f"exit_timeout={exit_timeout_s} must lie in 0..{MAX_EXIT_TIMEOUT_S} seconds",
                            "pytriton kills tritonserver 30 s after the stop request, cutting off what still "
                            "runs; e.g. exit_timeout=10")
    return None if log_file is None else check_output_path(Path(log_file), "log_file=").absolute()


def input_limit(models: list[RepoModel], requested: int | None) -> tuple[int, list[str]]:
    """The bytes of inputs one request may declare, and warnings: by default Triton 2.59's 64 MiB,
    raised to the largest full batch a served model takes (binary tensors), so no valid request is
    refused; a smaller --http-max-input-size is kept, with a warning naming the batch it cuts."""
    pb2 = model_config_pb2()
    full = {}
    for m in models:
        per_item = sum(math.prod(d for d in t.dims if d > 0)  # (-1: an unbatched model's batch dim)
                       * ELEMENT_BYTES.get(pb2.DataType.Name(t.data_type)[5:], 4) for t in m.config.input)
        full[m.name] = (per_item, max(1, m.config.max_batch_size))
    if requested is None:
        return max([DEFAULT_MAX_INPUT] + [p * b for p, b in full.values()]), []
    cut = [f"{name} (batches over {requested // per_item}, max batch {b})" for name, (per_item, b)
           in full.items() if per_item * b > requested]
    return requested, ([f"--http-max-input-size {requested} refuses full batches of "
                        f"{', '.join(cut)}"] if cut else [])


def _numpy_dtype(pb2, data_type: int):
    name = pb2.DataType.Name(data_type)
    if name not in TRITON_TO_NUMPY:
        raise BadInputError(f"data type {name} is not served by the local launcher", "use TYPE_FP32")
    return TRITON_TO_NUMPY[name]


class _OrtModel:
    """One ONNX Runtime session per Triton instance, running the outputs the config declares."""

    def __init__(self, rm: RepoModel, threads: int | None):
        runner = registry.get(registry.ORT_CPU).runner(rm.model_file, threads=threads)  # one ORT set-up
        runner.activate()
        self.session = runner.session
        have_in = {i.name for i in self.session.get_inputs()}
        have_in |= {i.name for i in self.session.get_overridable_initializers()}  # inputs with a default
        have_out = {o.name for o in self.session.get_outputs()}
        self.inputs = [t.name for t in rm.config.input]
        self.outputs = [t.name for t in rm.config.output]
        pb2 = model_config_pb2()
        # ORT returns int64 as numpy 'q' (longlong), which pytriton's strict check rejects as int64
        self.dtypes = [_numpy_dtype(pb2, t.data_type) for t in rm.config.output]
        missing = [n for n in self.inputs if n not in have_in]
        missing += [n for n in self.outputs if n not in have_out]
        if missing:
            raise BadInputError(f"{rm.model_file} has no tensor {', '.join(missing)} named in "
                                f"{rm.name}/config.pbtxt",
                                "rewrite the repository with `idle-export serve repo`")
        self.lock = threading.Lock()

    def __call__(self, **inputs):
        feed = rate_feed({k: inputs[k] for k in self.inputs if k in inputs})  # (optional keep_rate)
        with self.lock:
            values = self.session.run(self.outputs, feed)
        return {name: _as_dtype(v, dt) for name, v, dt in zip(self.outputs, values, self.dtypes, strict=True)}


def _as_dtype(value: np.ndarray, dtype) -> np.ndarray:
    value = np.asarray(value)
    want = np.dtype(dtype)
    if value.dtype == want and value.dtype.char != want.char:  # same layout, other name ('q' vs 'l')
        return value.view(want)
    return value.astype(want, copy=False)


@dataclass
class ServerHandle:
    url: str
    models: list[str]
    log_file: str | None
    max_input_bytes: int
    warnings: list[str]


def serve_repository(repo: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                     models: list[str] | None = None, threads: int | None = None,
                     grpc_port: int | None = None, metrics_port: int | None = None,
                     exit_timeout_s: int = 10, log_file: str | Path | None = None,
                     max_input_bytes: int | None = None, in_flight_bytes: int | None = None,
                     stop_event: threading.Event | None = None,
                     on_start: Callable[[], None] | None = None,
                     on_ready: Callable[[ServerHandle], None] | None = None,
                     handle_signals: bool = True) -> dict:
    """Serve the ONNX models of a repository with pytriton until SIGINT/SIGTERM (or stop_event).

    Each model is bound with the config's max_batch_size, dynamic batching (preferred sizes,
    queue delay), instance count and parameters; inference runs in this process with ONNX Runtime.
    On SIGTERM/SIGINT (or stop_event) the models are unloaded first, so Triton answers every request
    it accepted (up to exit_timeout_s) and refuses new ones, then tritonserver stops; nothing it
    started is left running. HTTP clients reach tritonserver through the request guard
    (serve/guard.py), which bounds each request to max_input_bytes of inputs (input_limit).
    Returns a summary dict once the server has stopped.
    """
    log_file = check_run_options(exit_timeout_s, log_file, max_input_bytes)
    for module, package in (("pytriton", "nvidia-pytriton"), ("aiohttp", "aiohttp")):
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError(f"{package} is not installed", SERVE_PIP) from None
    pb2 = model_config_pb2()
    if pb2 is None:
        raise MissingDependencyError("tritonclient is not installed", SERVE_PIP)
    all_models = read_repository(repo, models)
    served = [m for m in all_models if m.platform == ONNX_PLATFORM]
    skipped = [m.name for m in all_models if m.platform != ONNX_PLATFORM]
    if not served:
        raise MissingDependencyError(
            f"{', '.join(skipped)}: platform {all_models[0].platform} needs a Triton server with that "
            "backend (a TensorRT plan needs an NVIDIA GPU)",
            "serve the repository with the stock Triton container (docs/serving.md), "
            "or write an ONNX repo")
    for p, what in ((port, "port="), (grpc_port, "grpc_port="), (metrics_port, "metrics_port=")):
        if p is not None:
            check_port_free(host, p, what)
    limit, limit_warnings = input_limit(served, max_input_bytes)
    if threads is not None and threads < 1:
        raise BadInputError(f"threads={threads} must be at least 1", "pass threads=2")
    runtimes = {m.name: [_OrtModel(m, threads) for _ in range(_instance_count(m.config))] for m in served}

    fix_library_path()
    import logging

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    logging.getLogger("pytriton").setLevel(logging.WARNING)
    # its "exited with failure" warning on every stop that ran into the exit timeout: we say why
    logging.getLogger("pytriton.server.triton_server").setLevel(logging.ERROR)
    own_log = log_file is None
    if own_log:
        fd, log_file = tempfile.mkstemp(prefix="idle-export-triton-", suffix=".log")
        os.close(fd)
    inner_port = _free_loopback_port()  # tritonserver's HTTP; clients use the guard on host:port
    config = TritonConfig(http_address="127.0.0.1", http_port=inner_port, grpc_address=host,
                          allow_grpc=grpc_port is not None, grpc_port=grpc_port,
                          allow_metrics=metrics_port is not None, metrics_port=metrics_port,
                          metrics_address=host if metrics_port is not None else None,
                          exit_timeout_secs=exit_timeout_s, log_file=Path(log_file), log_verbose=0)
    security = TritonSecurityConfig(restricted_endpoints=RESTRICTED_ENDPOINTS)
    triton = Triton(config=config, security_config=security)

    stop = stop_event or threading.Event()
    received: list[str] = []
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            received.append(signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    url = f"http://{host}:{port}"
    started = time.perf_counter()
    tree: dict = {}
    drain = guard = None
    try:
        for m in served:
            unbatched = is_unbatched_elastic(m.config)  # each request alone, at its own keep rate
            funcs = [(lambda requests, rt=rt: run_requests(rt, requests)) if unbatched else batch(rt)
                     for rt in runtimes[m.name]]
            inputs = [Tensor(name=t.name, dtype=_numpy_dtype(pb2, t.data_type), shape=tuple(t.dims),
                             optional=t.optional) for t in m.config.input]
            outputs = [Tensor(name=t.name, dtype=_numpy_dtype(pb2, t.data_type), shape=tuple(t.dims))
                       for t in m.config.output]
            db = m.config.dynamic_batching
            batcher = DynamicBatcher(preferred_batch_size=list(db.preferred_batch_size) or None,
                                     max_queue_delay_microseconds=db.max_queue_delay_microseconds)
            mc = (ModelConfig(batching=False) if unbatched else
                  ModelConfig(max_batch_size=max(1, m.config.max_batch_size), batcher=batcher))
            triton.bind(model_name=m.name, infer_func=funcs if len(funcs) > 1 else funcs[0],
                        inputs=inputs, outputs=outputs, config=mc, model_version=m.version, strict=True)
            _add_parameters(triton, m)
        if on_start:  # the repository and options are fine: tritonserver starts now
            on_start()
        try:
            triton.run()
        except Exception as e:  # noqa: BLE001 - pytriton raises plain exceptions
            raise IdleExportError(f"Triton did not start ({type(e).__name__}: {str(e)[:200]})",
                                  f"see the server log {log_file}; {_log_tail(log_file)}") from None
        _quiet_stdout(triton)
        tree = process_tree()
        drain = Drain(f"http://127.0.0.1:{inner_port}", exit_timeout_s)
        guard = Guard(host, port, inner_port, limit, in_flight_bytes)
        guard.start()
        if on_ready:
            on_ready(ServerHandle(url, [m.name for m in served], None if own_log else str(log_file),
                                  limit, limit_warnings))
        ticks = 0
        while not stop.wait(0.5):
            ticks += 1
            if ticks % 10 == 0:  # a stub the Python backend restarted (~4 ms a look)
                tree.update(process_tree())
            if not triton.is_alive():
                raise IdleExportError(f"Triton stopped unexpectedly: {_why_stopped(triton, log_file)}",
                                      f"restart `serve run`; tritonserver's log: {log_file}")
        stopping = time.perf_counter()
        tree.update(process_tree())
        drain([m.name for m in served], tree, exit_timeout_s)
    finally:
        if drain is not None:
            drain.close()
        if guard is not None:  # answers are out once the drain is done; then no new connection
            guard.stop()
        triton.stop()
        stop_leftovers(tree)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_log and not sys.exc_info()[0]:
            Path(log_file).unlink(missing_ok=True)
    return {"url": url, "models": [m.name for m in served], "skipped": skipped, "max_input_bytes": limit,
            "uptime_s": round(stopping - started, 2), "shutdown_s": round(time.perf_counter() - stopping, 2),
            "signal": received[0] if received else None}


def _quiet_stdout(triton) -> None:
    """pytriton echoes what tritonserver prints on its stdout to ours (its TritonServer's verbose
    flag, on by default, not in TritonConfig): "Signal (2) received." on every stop. It keeps the
    lines (`logs()`, read for the crash cause); our stdout stays clean."""
    server = getattr(triton, "_triton_server", None)
    if server is not None and hasattr(server, "_verbose"):
        server._verbose = False


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _instance_count(cfg) -> int:
    return max(1, sum(g.count for g in cfg.instance_group) or 1)


def _add_parameters(triton, rm: RepoModel) -> None:
    """Show the repository's config parameters (idle_export.* metadata) in the served config.

    pytriton 0.7 has no public field for model parameters; its generated config is extended
    through the model's TritonModelConfig (checked by tests/serve/test_serve.py)."""
    params = {k: v.string_value for k, v in rm.config.parameters.items()}
    if not params:
        return
    try:
        model = next(m for m in triton._model_manager.models if m.model_name == rm.name)
        model._get_triton_model_config().backend_parameters.update(params)
    except Exception:  # noqa: BLE001 - a private API; serving still works without the metadata
        import warnings

        warnings.warn("could not pass the idle_export.* parameters to pytriton; `serve query` will fall "
                      "back to DeiT preprocessing defaults", stacklevel=2)


def _why_stopped(triton, log_file) -> str:
    """crash_cause from what tritonserver printed (pytriton keeps it; a private attribute), its
    exit code and its log."""
    server = getattr(triton, "_triton_server", None)
    cmd = getattr(server, "_tritonserver_running_cmd", None)
    alive, exit_code = False, None
    try:
        alive, exit_code = cmd.process.is_alive()
    except Exception:  # noqa: BLE001 - pytriton/sh internals; the cause is still looked for in the output
        pass
    if alive:  # pytriton also counts its in-process inference proxies
        return "a model's inference proxy in this process stopped while tritonserver still ran"
    time.sleep(0.3)  # sh hands the last lines over from its reader thread
    output = server.logs() if server is not None and hasattr(server, "logs") else ""
    try:
        log_text = Path(log_file).read_text(errors="replace")
    except OSError:
        log_text = ""
    return crash_cause(output, log_text, exit_code)


def _log_tail(log_file, lines: int = 3) -> str:
    try:
        text = Path(log_file).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    text = [ln for ln in text if not any(n in ln for n in LOG_NOISE)]
    errors = [ln for ln in text if ln.startswith("E")] or text
    return " | ".join(errors[-lines:])[:400]


