"""`serve query --wait S`: a server that is still starting (its port not open yet, then open but
not ready) is waited for, up to S seconds; without --wait the error's hint names it. The server is
a small KServe v2 stand-in on 127.0.0.1 (health and model index only), so no Triton is needed."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from idle_export.cli import app
from tests.conftest import error_lines

pytest.importorskip("tritonclient.http",
                    reason="tritonclient[http] not installed (pip install idle-export[serve])")
runner = CliRunner()


class Starting:
    """Opens its port after `open_after` s, says ready after `ready_after` s; serves no model."""

    def __init__(self, open_after: float, ready_after: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.t0 = time.monotonic()
        self.ready_after = ready_after
        self.asked_ready = 0
        self.httpd = None
        self.timer = threading.Timer(open_after, self._open)
        self.timer.start()

    def _open(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v2/health/ready":
                    owner.asked_ready += 1
                    ready = time.monotonic() - owner.t0 >= owner.ready_after
                    self._answer(200 if ready else 400, {} if ready else {"error": "starting"})
                elif self.path.startswith("/v2/models/stats"):
                    self._answer(200, {"model_stats": []})
                else:
                    self._answer(404, {"error": "not here"})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(200, [] if self.path == "/v2/repository/index" else {"error": "no"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.timer.cancel()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(path)
    return str(path)


def _query(*args):
    t0 = time.monotonic()
    result = runner.invoke(app, ["serve", "query", *args])
    lines = error_lines(result.stderr)
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0], time.monotonic() - t0


def test_wait_rides_out_a_closed_port_then_a_server_not_ready_yet(photo):
    server = Starting(open_after=1.0, ready_after=2.0)
    try:
        line, took = _query("--wait", "30", server.url, photo)
    finally:
        server.close()
    # past the wait: the server was asked what it serves (a stand-in that serves nothing)
    assert "0 models ready at" in line and "no Triton server" not in line, line
    assert 2.0 <= took < 15 and server.asked_ready >= 2


def test_without_wait_the_hint_names_it_and_with_too_short_a_wait_it_says_so(photo):
    server = Starting(open_after=0.0, ready_after=3600)
    try:
        time.sleep(0.3)
        line, took = _query(server.url, photo)
        assert line.startswith(f"error: the Triton server at {server.url} is not ready (hint: ")
        assert "pass --wait 60" in line and took < 10
        line, took = _query("--wait", "1.5", server.url, photo)
        assert "is not ready after waiting 1.5 s" in line and "longer --wait" in line, line
        assert 1.5 <= took < 10 and server.asked_ready >= 4
    finally:
        server.close()
    line, _ = _query("--wait", "0.5", server.url, photo)  # nobody listens at all
    assert line.startswith(f"error: no Triton server answers at {server.url} (")
    assert "after waiting 0.5 s" in line
