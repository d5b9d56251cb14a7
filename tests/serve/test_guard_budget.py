"""The guard's byte budget (serve/guard.py) in front of a small stand-in upstream on 127.0.0.1:
requests over the budget get 503 + Retry-After, and the bytes of every request are released
however it ends (answered, refused, or cut off by its client mid-body)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from idle_export.serve.guard import HEADER_SLACK, Guard

pytest.importorskip("aiohttp")
LIMIT = 2**20
BODY = b"x" * (LIMIT - 1000)  # not an inference path: only the size matters here


class SlowUpstream(BaseHTTPRequestHandler):
    """Reads the body, holds it 0.5 s (a model running), answers 200. Inference requests: says
    when one arrives (`arrived`) and keeps its body (`seen`)."""

    arrived = threading.Event()
    seen: list[bytes] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        infer = self.path.endswith("/infer")
        if infer:
            SlowUpstream.arrived.set()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if infer:
            SlowUpstream.seen.append(body)
        time.sleep(0.5)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture()
def guard():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), SlowUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = Guard("127.0.0.1", port, upstream.server_address[1], LIMIT, budget=2 * (LIMIT + HEADER_SLACK))
    g.start()
    try:
        yield g
    finally:
        g.stop(grace_s=1)
        upstream.shutdown()


def _post(port: int) -> tuple[object, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/upload", body=BODY)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Retry-After")
    except OSError:
        return "reset", None
    finally:
        conn.close()


def _settled(g: Guard, timeout: float = 10) -> int:
    deadline = time.time() + timeout
    while g.in_flight and time.time() < deadline:
        time.sleep(0.05)
    return g.in_flight


def test_requests_over_the_budget_get_503_and_every_byte_is_released(guard):
    with ThreadPoolExecutor(6) as ex:
        answers = list(ex.map(lambda _: _post(guard.port), range(6)))
    statuses = [a[0] for a in answers]
    assert statuses.count(200) >= 2, statuses  # the budget holds two at once
    assert 503 in statuses and all(a[1] == "1" for a in answers if a[0] == 503), statuses
    assert guard.busy_refused >= 1
    assert _settled(guard) == 0
    assert _post(guard.port)[0] == 200  # and it serves again


def test_a_client_that_hangs_up_mid_body_releases_its_bytes(guard):
    with socket.create_connection(("127.0.0.1", guard.port)) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BODY))
        s.sendall(BODY[:100_000])
        deadline = time.time() + 5
        while not guard.in_flight and time.time() < deadline:
            time.sleep(0.02)
        assert guard.in_flight == len(BODY)  # reserved from Content-Length before reading
    assert _settled(guard) == 0
    assert _post(guard.port)[0] == 200


def _binary_infer_head(body_len: int, header: bytes) -> bytes:
    return (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(header), body_len))


HEADER = (b'{"inputs":[{"name":"images","shape":[1,3,224,224],"datatype":"FP32",'
          b'"parameters":{"binary_data_size":602112}}]}')


def test_binary_requests_stream_on_to_triton_while_the_client_still_sends(guard):
    """A binary request is checked from its JSON header and passed on as it arrives: the upstream
    has the request before the client has sent its tensor bytes (no store-and-forward), gets
    every byte, and the bytes are released after the answer."""
    SlowUpstream.seen.clear()
    SlowUpstream.arrived.clear()
    body = HEADER + bytes(range(256)) * (602112 // 256)
    with socket.create_connection(("127.0.0.1", guard.port), timeout=30) as s:
        s.sendall(_binary_infer_head(len(body), HEADER) + body[:300_000])
        assert SlowUpstream.arrived.wait(10), "the guard held the request until its whole body came"
        assert guard.in_flight == len(body)
        s.sendall(body[300_000:])
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:80]
    assert SlowUpstream.seen == [body]
    assert _settled(guard) == 0


def test_a_binary_request_cut_off_mid_body_releases_its_bytes(guard):
    body = HEADER + b"\0" * 602112
    with socket.create_connection(("127.0.0.1", guard.port)) as s:
        s.sendall(_binary_infer_head(len(body), HEADER) + body[:100_000])
        deadline = time.time() + 5
        while not guard.in_flight and time.time() < deadline:
            time.sleep(0.02)
        assert guard.in_flight == len(body)
    assert _settled(guard) == 0
    assert _post(guard.port)[0] == 200


def test_a_binary_header_over_the_limit_is_refused_before_the_tensor_bytes(guard):
    bomb = b'{"inputs":[{"name":"images","shape":[100000000,3,224,224],"datatype":"FP32"}]}'
    with socket.create_connection(("127.0.0.1", guard.port), timeout=30) as s:
        s.sendall(_binary_infer_head(len(bomb) + 1000, bomb) + bomb)  # the 1000 tensor bytes never come
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b"declares shape [100000000, 3, 224, 224]" in reply, reply
    assert _settled(guard) == 0


def test_a_binary_body_declared_over_the_limit_gets_413_before_it_is_read(guard):
    with socket.create_connection(("127.0.0.1", guard.port), timeout=30) as s:
        s.sendall(_binary_infer_head(LIMIT + HEADER_SLACK + 1, HEADER) + HEADER)
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413") and b"the request body is over" in reply, reply
    assert _settled(guard) == 0
