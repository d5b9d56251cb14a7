"""Server limits (docs/reliability.md, "Server limits"): a real `idle-export serve run` on
127.0.0.1 gets malformed requests over raw HTTP, 50 concurrent valid requests, SIGTERM with
requests in flight, and the one request that Triton 2.51 cannot survive (the shape bomb).

Two servers start here (~10 s each): the module's, which SIGTERM ends last, and one for the shape
bomb, which kills it. Every answer is compared with ONNX Runtime run directly on the same images.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from tests.serve.test_serve import (
    MAX_BATCH,
    Server,
    descendants,
    free_port,
    http_client,
    infer,
    still_running,
)

pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed (pip install "
                    "idle-export[serve])")
pytest.importorskip("pytriton", reason="nvidia-pytriton not installed (pip install idle-export[serve])")

MODEL = "tiny_idle"
TOL = 1e-5


@pytest.fixture(scope="module")
def repo(tiny_idle_onnx, tmp_path_factory) -> Path:
    from idle_export.serve.repository import write_repository

    root = tmp_path_factory.mktemp("reliability") / "model_repository"
    write_repository(tiny_idle_onnx, root, name=MODEL, max_batch=MAX_BATCH, preferred=[4, 8],
                     queue_delay_us=2000)
    return root


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = Server(repo, free_port(), tmp_path_factory.mktemp("log") / "serve_run.err")
    try:
        srv.wait_ready([MODEL])
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def pool(tiny_idle_onnx):
    """16 inputs (8 seeded noise, 8 photos) and their logits from ONNX Runtime run directly."""
    from idle_export.data.inputs import builtin_photos, seeded_noise
    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.runtime.onnxruntime import OrtRunner

    spec = OnnxMetadata.read(tiny_idle_onnx).spec
    x = np.concatenate([seeded_noise(8, spec, seed=3), builtin_photos(8, spec, seed=3)])
    with OrtRunner(tiny_idle_onnx, threads=2) as r:
        return x, r.infer({"images": x})["logits"]


def post(port: int, body: bytes, model: str = MODEL) -> tuple[int, str]:
    """A raw KServe v2 JSON request, as any HTTP client can send it: (status, error text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text).get("error", text)
    except ValueError:
        return resp.status, text


def tensor(shape, datatype: str = "FP32", name: str = "images", data=None) -> bytes:
    count = int(np.prod(shape)) if data is None else None
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype,
                                   "data": [0.0] * count if data is None else data}]}).encode()


def assert_serves(server, pool) -> None:
    x, ref = pool
    client = http_client(server.url)
    try:
        out = infer(client, MODEL, x[:3])
    finally:
        client.close()
    assert np.abs(out - ref[:3]).max() <= TOL


def stub_folders(tree: dict[int, tuple[str, str]]) -> list[Path]:
    """Triton's temporary model copies (/tmp/folderXXXXXX) that the Python-backend stubs run."""
    folders = []
    for pid, (comm, _) in tree.items():
        if comm.startswith("triton_python"):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            folders.append(Path(argv[1].decode()).parents[1])
    return folders


def assert_nothing_left(tree: dict[int, tuple[str, str]], folders: list[Path], port: int) -> None:
    deadline = time.time() + 10
    while time.time() < deadline and any(still_running(p, st) for p, (_, st) in tree.items()):
        time.sleep(0.2)
    left = {p: comm for p, (comm, st) in tree.items() if still_running(p, st)}
    assert not left, f"processes left behind: {left}"
    assert folders and not [f for f in folders if f.exists()], f"model copies left: {folders}"
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


# Triton's own answers (2.51, the one in pytriton 0.7; upstream main still does the same). Its HTTP
# front end reports JSON it cannot parse, or whose members have the wrong JSON type, as an internal
# error (500): TritonJson errors are TRITONSERVER_ERROR_INTERNAL. Nothing configures that.
MALFORMED = {
    "invalid JSON": (b"{not json", 500, "failed to parse the request JSON"),
    "truncated JSON": (b'{"inputs": [{"name": "images", "sha', 500, "failed to parse the request JSON"),
    "no inputs member": (b"{}", 500, "Unable to parse 'inputs'"),
    "inputs not a list": (b'{"inputs": 3}', 500, "Unable to parse 'inputs'"),
    "no datatype": (json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 2, 2], "data": [0.0] * 12}]})
                    .encode(), 500, "Unable to parse 'datatype'"),
    "negative dimension": (tensor([-1, 3, 2, 2], data=[0.0] * 12), 500, "Unable to parse 'shape'"),
    "strings as data": (tensor([1, 3, 2, 2], data=["a"] * 12), 500, "Unable to parse 'data'"),
    "fewer numbers than the shape": (tensor([1, 3, 224, 224], data=[0.0] * 10), 500,
                                     "Shape does not match true shape of 'data'"),
    "empty body": (b"", 400, "input byte size mismatch"),
    "missing input": (b'{"inputs": []}', 400, "missing required input(s) ['images']"),
    "wrong input name": (tensor([1, 3, 2, 2], name="x"), 400, "unexpected inference input 'x'"),
    "wrong shape": (tensor([1, 3, 2, 2]), 400, "unexpected shape for input 'images'"),
    "wrong rank": (tensor([1, 3, 224]), 400, "unexpected shape for input 'images'"),
    "wrong datatype": (tensor([1, 3, 2, 2], "FP64"), 400, "data-type is 'FP64', but model"),
    "integer datatype": (tensor([1, 3, 2, 2], "INT32", data=[0] * 12), 400, "data-type is 'INT32'"),
    "unknown datatype": (tensor([1, 3, 2, 2], "XX"), 400, "invalid datatype for input images"),
    "batch over the maximum": (tensor([MAX_BATCH + 1, 3, 2, 2]), 400, f"batch-size must be <= {MAX_BATCH}"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_an_error_and_the_server_keeps_serving(server, pool, case):
    body, status, match = MALFORMED[case]
    got, error = post(server.port, body)
    assert (got, match in error) == (status, True), f"{case}: {got} {error}"
    assert_serves(server, pool)


def test_unknown_model_is_404(server, pool):
    assert post(server.port, tensor([1, 3, 2, 2]), model="nope")[0] == 404
    assert_serves(server, pool)


def test_binary_shape_bomb_is_refused(server, pool):
    """The binary form of the shape bomb (what tritonclient sends): Triton sizes the input from the
    bytes that came, so the batch limit answers it."""
    header = json.dumps({"inputs": [{"name": "images", "shape": [100_000_000, 3, 224, 224],
                                     "datatype": "FP32", "parameters": {"binary_data_size": 40}}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=header + bytes(40),
                     headers={"Inference-Header-Content-Length": str(len(header))})
        resp = conn.getresponse()
        status, error = resp.status, resp.read().decode()
    finally:
        conn.close()
    assert status == 400 and f"batch-size must be <= {MAX_BATCH}" in error
    assert_serves(server, pool)


def test_50_concurrent_requests_match_onnxruntime(server, pool):
    x, ref = pool
    rng = np.random.default_rng(50)
    plan = [rng.choice(len(x), size=int(rng.integers(1, 4)), replace=False) for _ in range(50)]
    start = threading.Barrier(50)

    def send(idx):
        client = http_client(server.url)
        try:
            start.wait(60)  # all 50 at once
            return infer(client, MODEL, x[idx])
        finally:
            client.close()

    with ThreadPoolExecutor(50) as ex:
        outs = list(ex.map(send, plan))
    assert [o.shape for o in outs] == [(len(i), 1000) for i in plan]
    worst = max(float(np.abs(o - ref[i]).max()) for i, o in zip(plan, outs, strict=True))
    assert worst <= TOL, f"max abs diff to ONNX Runtime {worst:.2e}"


def test_sigterm_with_requests_in_flight(server, pool):
    """Clients keep sending; SIGTERM arrives while requests run. Every request sent before it is
    answered exactly; later ones are refused (404 from the unloading model, then no connection),
    never cut off or answered wrongly; `serve run` exits 0 and leaves nothing behind. Runs last:
    it ends the module's server."""
    x, ref = pool
    tree = descendants(server.proc.pid)
    folders = stub_folders(tree)
    results, lock, done = [], threading.Lock(), threading.Event()

    def client_loop(k: int):
        client = http_client(server.url)
        idx = np.arange(k % 3 + 1) + k
        try:
            while True:
                t0 = time.monotonic()
                try:
                    out, err = infer(client, MODEL, x[idx]), None
                except Exception as e:  # noqa: BLE001 - what a client sees is the point
                    out, err = None, f"{type(e).__name__}: {e}"
                with lock:
                    results.append((t0, time.monotonic(), idx, out, err))
                if err is not None or done.is_set():
                    return
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    while len(results) < 8:  # traffic is flowing
        time.sleep(0.05)
    sent_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join(120)
    rc = server.proc.wait(90)
    err_text = server.stderr.read_text()
    assert rc == 0, err_text[-2000:]
    assert "stopped (SIGTERM)" in err_text and "Traceback" not in err_text
    before = [r for r in results if r[0] < sent_at - 0.05]
    assert [r for r in before if r[1] > sent_at], "no request was in flight at SIGTERM"
    assert all(r[4] is None for r in before), [r[4] for r in before if r[4]]
    answered = [r for r in results if r[4] is None]
    worst = max(float(np.abs(out - ref[idx]).max()) for _, _, idx, out, _ in answered)
    assert worst <= TOL, f"max abs diff to ONNX Runtime {worst:.2e}"
    refused = [r[4] for r in results if r[4] is not None]
    assert all("has no available versions" in e or e.startswith("ConnectionRefusedError")
               for e in refused), refused
    assert_nothing_left(tree, folders, server.port)
    assert not list(Path("/dev/shm").glob(f"pytrtion{server.proc.pid}-*"))


def test_json_shape_bomb_kills_triton_251_and_serve_run_names_the_cause(repo, pool, tmp_path):
    """~150 bytes of JSON declaring [100000000, 3, 224, 224] with ten numbers. Triton 2.51 allocates
    the declared 60 TB before it compares the shape with the data or the model's batch limit, and
    aborts (std::bad_alloc): its JSON front end has no size limit (`--http-max-input-size` arrived
    in Triton 2.59; pytriton 0.7 ships 2.51). What `serve run` guarantees instead: it notices at
    once, names the cause, exits 4 and leaves nothing behind."""
    srv = Server(repo, free_port(), tmp_path / "serve_run.err")
    try:
        srv.wait_ready([MODEL])
        tree = descendants(srv.proc.pid)
        folders = stub_folders(tree)
        body = tensor([100_000_000, 3, 224, 224], data=[0.0] * 10)
        assert len(body) < 200
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            post(srv.port, body)
        rc = srv.proc.wait(60)
    finally:
        srv.kill()
    err_text = srv.stderr.read_text()
    assert rc == 4, err_text
    (line,) = [ln for ln in err_text.splitlines() if ln.startswith("error:")]
    assert "Triton stopped unexpectedly: tritonserver aborted on std::bad_alloc" in line
    assert "declar" in line and "docs/reliability.md" in line and "Traceback" not in err_text
    kept = Path(line.split("tritonserver's log: ")[1].rstrip(")"))  # kept for the user, as the hint says
    assert "Started HTTPService" in kept.read_text()
    kept.unlink()
    assert_nothing_left(tree, folders, srv.port)
    with pytest.raises(ConnectionError):
        post(srv.port, tensor([1, 3, 224, 224]))


@pytest.mark.parametrize("output, log, code, says", [
    ("terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n"
     "Signal (6) received.\n", "", -6, "aborted on std::bad_alloc: an allocation failed; a JSON request"),
    ("terminate called after throwing an instance of 'std::runtime_error'\n  what():  oops\n", "", -6,
     "aborted on an uncaught C++ exception std::runtime_error (oops)"),
    ("Signal (11) received.\n", "", -11, "tritonserver crashed (SIGSEGV)"),
    ("", "", -9, "killed (SIGKILL): the kernel's out-of-memory killer"),
    ("Signal (15) received.\n", "", 0, "stopped by SIGTERM, sent to it and not to `serve run`"),
    ("", 'E1204 server.cc:241] "CudaDriverHelper has not been initialized."\nE1204 x.cc:1] "boom"\n'
     'E1204 model_repository_manager.cc:470] "Failed to set config modification time: ..."\n', 1,
     'exited with code 1: E1204 x.cc:1] "boom"'),
])
def test_crash_cause_names_why_tritonserver_stopped(output, log, code, says):
    from idle_export.serve.process import crash_cause

    assert says in crash_cause(output, log, code)


def test_run_and_query_option_errors(repo, tmp_path):
    """Usage errors, each one line before anything starts (exit 2)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["serve", "run", str(repo), "--exit-timeout", "-1"], "--exit-timeout -1 must lie in 0..25"),
        (["serve", "run", str(repo), "--exit-timeout", "26"], "--exit-timeout 26 must lie in 0..25"),
        (["serve", "run", str(repo), "--log-file", str(blocker / "t.log")], "is not a folder"),
        (["serve", "run", str(repo), "--model", "nope"], f"models there: {MODEL}"),
        (["serve", "query", "http://127.0.0.1:9", str(blocker), "--timeout", "0"],
         "--timeout 0 must be a number of seconds above 0"),
    ]
    for args, match in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert match in result.output and "Traceback" not in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
