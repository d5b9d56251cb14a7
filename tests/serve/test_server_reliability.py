"""Server limits (docs/reliability.md, "Server limits"): a real `idle-export serve run` on
127.0.0.1 gets malformed, oversized and compressed requests over raw HTTP (the JSON shape bomb
that aborts a bare Triton 2.51 among them) and over gRPC, 50 concurrent valid requests, and SIGTERM
with requests in flight.

Two servers start here (~10 s each): the module's, which SIGTERM ends last, and one whose
tritonserver the test kills, to check what `serve run` says and leaves then. Every answer is
compared with ONNX Runtime run directly on the same images.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import select
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
    reference_pool,
    still_running,
)

pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed (pip install "
                    "idle-export[serve])")
pytest.importorskip("pytriton", reason="nvidia-pytriton not installed (pip install idle-export[serve])")

MODEL = "tiny_idle"
TOL = 1e-5
LIMIT = 8 * 2**20  # the module server's --http-max-input-size: a full batch of 8 (4.8 MB) fits


@pytest.fixture(scope="module")
def repo(tiny_idle_onnx, tmp_path_factory) -> Path:
    from idle_export.serve.repository import write_repository

    root = tmp_path_factory.mktemp("reliability") / "model_repository"
    write_repository(tiny_idle_onnx, root, name=MODEL, max_batch=MAX_BATCH, preferred=[4, 8],
                     queue_delay_us=2000)
    return root


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = Server(repo, free_port(), tmp_path_factory.mktemp("log") / "serve_run.err",
                 ("--http-max-input-size", "8MiB", "--grpc-port", str(free_port())))
    try:
        srv.wait_ready([MODEL])
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def pool(tiny_idle_onnx):
    return reference_pool(tiny_idle_onnx, noise=8, photos=8, seed=3)


def post(port: int, body: bytes, model: str = MODEL, headers: dict | None = None) -> tuple[int, str]:
    """A raw KServe v2 JSON request, as any HTTP client can send it: (status, error text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
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


def binary(shape, data_bytes: int) -> tuple[bytes, dict]:
    """A binary-tensor request (what tritonclient sends): JSON header, then the raw bytes."""
    header = json.dumps({"inputs": [{"name": "images", "shape": list(shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": data_bytes}}]}).encode()
    return header + bytes(data_bytes), {"Inference-Header-Content-Length": str(len(header))}


BOMB = tensor([100_000_000, 3, 224, 224], data=[0.0] * 10)  # 147 bytes; aborts a bare Triton 2.51
OVER = f"this server takes at most {LIMIT:,} bytes of inputs per request (serve run --http-max-input-size)"
# (body, headers, status, message). The guard of `serve run` (serve/guard.py) answers the first
# group; Triton answers the rest, its 500s for request JSON it cannot parse turned into 400.
MALFORMED = {
    "JSON shape bomb": (BOMB, {}, 400, f"declares shape [100000000, 3, 224, 224] (60,211,200,000,000 bytes): "
                                      f"{OVER}"),
    "binary shape bomb": (*binary([100_000_000, 3, 224, 224], 40), 400, OVER),
    "declared size just over the limit": (tensor([14, 3, 224, 224], data=[0.0] * 10), {}, 400, OVER),
    "body over the limit": (b" " * (LIMIT + 2**17), {}, 413, "the request body is over 8,454,144 bytes"),
    "gzip bomb": (gzip.compress(b" " * (64 * 2**20)), {"Content-Encoding": "gzip"}, 413,
                  "the request body inflates to more than 8388608 bytes"),
    "not gzip": (b"{}", {"Content-Encoding": "gzip"}, 400, "failed to decompress the gzip request body"),
    "unknown encoding": (b"{}", {"Content-Encoding": "br"}, 400, "unsupported Content-Encoding 'br'"),
    "header length past the body": (b"{}", {"Inference-Header-Content-Length": "99"}, 400,
                                    "Inference-Header-Content-Length '99' is not a length within"),
    "invalid JSON": (b"{not json", {}, 400, "failed to parse the request JSON"),
    "truncated JSON": (b'{"inputs": [{"name": "images", "sha', {}, 400, "failed to parse the request JSON"),
    "deeply nested JSON": (b"[" * 100_000, {}, 400, "failed to parse the request JSON"),
    "no inputs member": (b"{}", {}, 400, "Unable to parse 'inputs'"),
    "inputs not a list": (b'{"inputs": 3}', {}, 400, "Unable to parse 'inputs'"),
    "input not an object": (b'{"inputs": [3]}', {}, 400, "Unable to parse 'inputs': input 0 is not"),
    "negative dimension": (tensor([-1, 3, 2, 2], data=[0.0] * 12), {}, 400, "Unable to parse 'shape'"),
    "fractional dimension": (tensor([1.5, 3, 2, 2], data=[0.0] * 12), {}, 400, "Unable to parse 'shape'"),
    "no datatype": (json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 2, 2], "data": [0.0] * 12}]})
                    .encode(), {}, 400, "Unable to parse 'datatype'"),
    "strings as data": (tensor([1, 3, 2, 2], data=["a"] * 12), {}, 400, "Unable to parse 'data'"),
    "fewer numbers than the shape": (tensor([1, 3, 224, 224], data=[0.0] * 10), {}, 400,
                                     "Shape does not match true shape of 'data'"),
    "empty body": (b"", {}, 400, "input byte size mismatch"),
    "missing input": (b'{"inputs": []}', {}, 400, "missing required input(s) ['images']"),
    "wrong input name": (tensor([1, 3, 2, 2], name="x"), {}, 400, "unexpected inference input 'x'"),
    "wrong shape": (tensor([1, 3, 2, 2]), {}, 400, "unexpected shape for input 'images'"),
    "wrong rank": (tensor([1, 3, 224]), {}, 400, "unexpected shape for input 'images'"),
    "wrong datatype": (tensor([1, 3, 2, 2], "FP64"), {}, 400, "data-type is 'FP64', but model"),
    "integer datatype": (tensor([1, 3, 2, 2], "INT32", data=[0] * 12), {}, 400, "data-type is 'INT32'"),
    "unknown datatype": (tensor([1, 3, 2, 2], "XX"), {}, 400, "invalid datatype for input images"),
    "batch over the maximum": (tensor([MAX_BATCH + 1, 3, 2, 2]), {}, 400,
                               f"batch-size must be <= {MAX_BATCH}"),
    "binary batch over the maximum": (*binary([MAX_BATCH + 1, 3, 2, 2], 4 * 12 * (MAX_BATCH + 1)), 400,
                                      f"batch-size must be <= {MAX_BATCH}"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_an_error_and_the_server_keeps_serving(server, pool, case):
    body, headers, status, match = MALFORMED[case]
    got, error = post(server.port, body, headers=headers)
    assert (got, match in error) == (status, True), f"{case}: {got} {error}"
    assert_serves(server, pool)


def test_chunked_body_over_the_limit_is_refused(server, pool):
    """No Content-Length to refuse up front: the guard counts the chunks as they come."""
    def chunks():
        for _ in range(LIMIT // 2**20 + 2):
            yield b" " * 2**20

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=chunks(), encode_chunked=True,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, text = resp.status, resp.read().decode()
    finally:
        conn.close()
    assert status == 413 and "the request body is over" in text, (status, text)
    assert_serves(server, pool)


def test_unknown_model_is_404(server, pool):
    assert post(server.port, tensor([1, 3, 2, 2]), model="nope")[0] == 404
    assert_serves(server, pool)


def test_compressed_and_full_batch_requests_are_answered_exactly(server, pool):
    """What the guard passes on is untouched: gzip and deflate both ways, a full batch of 8 in
    binary form (4.8 MB, under the 8 MiB limit), and JSON."""
    import tritonclient.http as httpclient

    x, ref = pool
    client = http_client(server.url)
    try:
        for algorithm in ("gzip", "deflate"):
            inp = httpclient.InferInput("images", list(x[:2].shape), "FP32")
            inp.set_data_from_numpy(x[:2])
            result = client.infer(MODEL, [inp], request_compression_algorithm=algorithm,
                                  response_compression_algorithm=algorithm)
            assert np.abs(result.as_numpy("logits") - ref[:2]).max() <= TOL, algorithm
        assert np.abs(infer(client, MODEL, x[:MAX_BATCH]) - ref[:MAX_BATCH]).max() <= TOL
        inp = httpclient.InferInput("images", [1, 3, 224, 224], "FP32")
        inp.set_data_from_numpy(x[:1], binary_data=False)  # JSON numbers
        as_json = httpclient.InferRequestedOutput("logits", binary_data=False)
        out = client.infer(MODEL, [inp], outputs=[as_json])
        assert np.abs(out.as_numpy("logits") - ref[:1]).max() <= TOL
    finally:
        client.close()


def test_grpc_shape_bombs_are_refused(server, pool):
    """Triton 2.51's gRPC endpoint sizes inputs from the contents it received (no guard needed):
    raw and typed contents declaring [100000000, 3, 224, 224] get INVALID_ARGUMENT."""
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    port = int(server.proc.args[server.proc.args.index("--grpc-port") + 1])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def request(shape, raw: bytes | None = None, typed: list[float] | None = None):
        req = service_pb2.ModelInferRequest(model_name=MODEL)
        t = req.inputs.add(name="images", datatype="FP32", shape=shape)
        if raw is not None:
            req.raw_input_contents.append(raw)
        else:
            t.contents.fp32_contents.extend(typed)
        return req

    for req, says in [(request([100_000_000, 3, 224, 224], raw=bytes(40)), "batch-size must be <= 8"),
                      (request([100_000_000, 3, 224, 224], typed=[0.0] * 10), "batch-size must be <= 8"),
                      (request([1, 3, 224, 224], raw=bytes(40)), "input byte size mismatch")]:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in info.value.details()
    x, ref = pool
    out = stub.ModelInfer(request(list(x[:2].shape), raw=x[:2].tobytes()), timeout=60)
    logits = np.frombuffer(out.raw_output_contents[0], np.float32).reshape(2, -1)
    assert np.abs(logits - ref[:2]).max() <= TOL
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


def _peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory process `pid` has had, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_many_large_requests_at_once_get_503_and_memory_stays_bounded(server, pool):
    """50 clients each send a 7.2 MB binary request (under the 8 MiB limit) at the same moment:
    360 MB in all against the guard's budget of 16 full requests (~130 MB). Requests over the
    budget get 503 with Retry-After before their body is read; the server process's peak memory
    grows by less than the sum of the bodies; afterwards it answers exactly."""
    from idle_export.serve.guard import HEADER_SLACK, default_budget

    budget = default_budget(LIMIT)
    assert budget == 16 * (LIMIT + HEADER_SLACK)  # this machine has the memory for the default
    shape = [12, 3, 224, 224]  # over max batch 8: Triton reads it, then answers 400
    header = json.dumps({"inputs": [{"name": "images", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": int(np.prod(shape)) * 4}}]}).encode()
    body = header + np.zeros(shape, np.float32).tobytes()
    assert len(body) < LIMIT and 50 * len(body) > 2 * budget
    before = _peak_rss(server.proc.pid)
    start = threading.Barrier(50)

    def send(_):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            conn.putrequest("POST", f"/v2/models/{MODEL}/infer")
            for key, value in (("Inference-Header-Content-Length", str(len(header))),
                               ("Content-Type", "application/octet-stream"),
                               ("Content-Length", str(len(body)))):
                conn.putheader(key, value)
            conn.endheaders()
            # Every client's headers are in before any body is sent, so all 50 are in flight at
            # once however the threads are scheduled (on one core the bodies of a plain send
            # never overlapped): the guard admits or refuses each on its declared length.
            start.wait(60)
            time.sleep(2)
            if not select.select([conn.sock], [], [], 0)[0]:  # not answered yet: admitted
                conn.send(body)
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
            return resp.status, resp.getheader("Retry-After"), text
        except (ConnectionError, OSError):  # refused before the body was read: the socket closes
            return "reset", None, ""
        finally:
            conn.close()

    with ThreadPoolExecutor(50) as ex:
        answers = list(ex.map(send, range(50)))
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {400, 503}, statuses
    assert 400 in statuses  # some got through to Triton (batch 12 > max batch 8)
    busy = [a for a in answers if a[0] == 503]
    assert busy and all(a[1] == "1" and "server busy" in a[2] for a in busy), statuses
    grown = _peak_rss(server.proc.pid) - before
    assert grown < 50 * len(body) * 0.75, f"peak memory grew by {grown / 1e6:.0f} MB"
    assert_serves(server, pool)


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


def test_killed_tritonserver_is_named_and_nothing_is_left(repo, pool, tmp_path):
    """When tritonserver dies under `serve run` (here SIGKILL, as the kernel's out-of-memory killer
    sends it), `serve run` notices at once, names the cause, exits 4, keeps tritonserver's log for
    the user and leaves no process, model copy or listening port behind."""
    srv = Server(repo, free_port(), tmp_path / "serve_run.err")
    try:
        srv.wait_ready([MODEL])
        tree = descendants(srv.proc.pid)
        folders = stub_folders(tree)
        (triton,) = [p for p, (comm, _) in tree.items() if comm == "tritonserver"]
        os.kill(triton, signal.SIGKILL)
        rc = srv.proc.wait(60)
    finally:
        srv.kill()
    err_text = srv.stderr.read_text()
    assert rc == 4, err_text
    (line,) = [ln for ln in err_text.splitlines() if ln.startswith("error:")]
    assert "Triton stopped unexpectedly: tritonserver was killed (SIGKILL)" in line
    assert "out-of-memory killer" in line and "Traceback" not in err_text
    kept = Path(line.split("tritonserver's log: ")[1].rstrip(")"))  # kept for the user, as the hint says
    assert "Started HTTPService" in kept.read_text()
    kept.unlink()
    assert_nothing_left(tree, folders, srv.port)
    with pytest.raises(ConnectionError):
        post(srv.port, tensor([1, 3, 224, 224]))


@pytest.mark.parametrize("output, log, code, says", [
    ("terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n"
     "Signal (6) received.\n", "", -6, "aborted on std::bad_alloc: an allocation failed; memory ran out"),
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

