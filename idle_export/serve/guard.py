"""The request guard of `serve run`: a small HTTP front (aiohttp) that listens on the user's port and
passes every request to tritonserver, which listens on a loopback port of its own.

Why: Triton 2.51 (the one nvidia-pytriton 0.7 bundles) sizes a JSON input from its *declared*
shape and allocates it before any check, so one 150-byte request declaring [100000000,3,224,224]
aborts it (std::bad_alloc); it reads bodies of any size; and it answers request JSON it cannot
parse with 500. Triton 2.59 added `--http-max-input-size`; this front does the same for 2.51:

- a body over the limit gets 413; a gzip/deflate body is inflated (bounded) for the checks and
  passed on as it came;
- an inference request whose inputs declare more bytes than the limit gets 400, as does one that
  is not JSON or whose `inputs`/`shape` cannot be read (Triton's wording, so clients that match
  on it still do);
- a binary request (JSON header + tensor bytes) is checked from its header and its tensor bytes
  are streamed on as they arrive; other bodies are read whole first;
- Triton's own 500 for request JSON it cannot parse ("failed to parse", "Unable to parse")
  becomes 400; every other answer, header and byte is passed on unchanged.

The checks (`request_json`, `check_infer_request`) are plain functions; `Guard` runs the front in
a thread with its own event loop.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import zlib
from dataclasses import dataclass

from idle_export.errors import BadInputError, IdleExportError
from idle_export.hardware import memory_available

DEFAULT_MAX_INPUT = 64 * 2**20  # Triton 2.59's --http-max-input-size default
HEADER_SLACK = 64 * 2**10  # the JSON header of a binary request on top of its tensors
INFER_PATH = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?/infer$")
# bytes per element; BYTES elements carry at least their 4-byte length
ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
                 "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}
# Triton's HTTP front end creates every error of its request-JSON parser as INTERNAL (500)
TRITON_PARSE_ERRORS = ("failed to parse", "Unable to parse")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
              "upgrade", "content-length", "host", "expect"}


@dataclass
class Refused(Exception):
    status: int
    message: str


def request_json(body: bytes, header_length: str | None, encoding: str | None, limit: int) -> bytes:
    """The JSON part of an inference request body: all of it, or the first
    Inference-Header-Content-Length bytes of a binary request, inflated when the body is
    gzip/deflate-encoded (never more than limit + HEADER_SLACK bytes)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip wrapper, as Triton accepts
        try:
            body = inflater.decompress(body, limit + HEADER_SLACK + 1)
        except zlib.error as e:
            raise Refused(400, f"failed to decompress the {encoding} request body: {e}") from None
        if len(body) > limit + HEADER_SLACK or inflater.unconsumed_tail:
            raise Refused(413, f"the request body inflates to more than {limit} bytes, this server's "
                               "limit (serve run --http-max-input-size)")
    elif encoding != "identity":
        raise Refused(400, f"unsupported Content-Encoding '{encoding}': use gzip, deflate or none")
    if header_length is None:
        return body
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise Refused(400, f"Inference-Header-Content-Length {header_length!r} is not a length within "
                           f"the {len(body)}-byte body")
    return body[:n]


def check_infer_request(text: bytes, limit: int) -> None:
    """Refused(400) when the request cannot be read or its inputs declare more than `limit` bytes
    in all; the rest (names, types, shapes against the model, data) is Triton's to check."""
    try:
        doc = json.loads(text) if text.strip() else None
    except (ValueError, RecursionError) as e:
        raise Refused(400, f"failed to parse the request JSON buffer: {e}") from None
    if doc is None:
        return  # an empty body: Triton answers "input byte size mismatch" (400)
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, list):
        raise Refused(400, "Unable to parse 'inputs': the request needs an 'inputs' list")
    total = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise Refused(400, f"Unable to parse 'inputs': input {i} is not a JSON object")
        name, shape = tensor.get("name", f"#{i}"), tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise Refused(400, f"Unable to parse 'shape' of input '{name}': it must be a list of "
                               "non-negative integers")
        size = math.prod(shape) * ELEMENT_BYTES.get(tensor.get("datatype"), 1)
        total += size
        if total > limit:
            raise Refused(400, f"input '{name}' declares shape {shape} ({size:,} bytes): this server "
                               f"takes at most {limit:,} bytes of inputs per request "
                               "(serve run --http-max-input-size)")


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def is_parse_error(status: int, body: bytes) -> bool:
    """Triton's 500 for request JSON it could not parse (an error of the request, not the server)."""
    if status != 500 or len(body) > 65536:
        return False
    try:
        message = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        return False
    return isinstance(message, str) and message.startswith(TRITON_PARSE_ERRORS)


def default_budget(limit: int) -> int:
    """Bytes of request bodies the guard holds at once by default: 16 full-size requests (1 GiB at
    the 64 MiB default), at most a quarter of the memory available at start (a JSON body costs
    ~4x its size while parsed), never less than one full-size request."""
    available = memory_available() or 8 * 2**30
    return max(limit + HEADER_SLACK, min(16 * (limit + HEADER_SLACK), available // 4))


class Guard:
    """The front: listens on host:port, forwards to tritonserver at 127.0.0.1:upstream_port."""

    JSON_IN_THREAD = 256 * 2**10  # parse larger JSON off the event loop
    # aiohttp buffers at most twice this much of a request body before it stops reading the
    # socket; at 64 KiB (aiohttp's default is 256) the tensor bytes move on to tritonserver in
    # smaller steps that overlap more: the guard's cost fell by ~0.35 ms at batch 1 and ~0.45 ms
    # at batch 8 (docs/reliability.md, "The cost")
    READ_BUFSIZE = 64 * 2**10

    def __init__(self, host: str, port: int, upstream_port: int, limit: int, budget: int | None = None):
        self.host, self.port, self.limit = host, port, limit
        # bytes of request bodies held at once (read, checked, on their way to Triton and back):
        # over it a request gets 503 + Retry-After, as Triton's own max_queue_size answers; one
        # request always fits, so a lone full-size request is never refused
        self.budget = max(limit + HEADER_SLACK, budget or default_budget(limit))
        self.in_flight = 0
        self.busy_refused = 0
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self._thread: threading.Thread | None = None
        self._loop = None
        self._stop = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 30) -> None:
        self._thread = threading.Thread(target=self._run, name="idle-export-guard", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise IdleExportError("the HTTP front of `serve run` did not start",
                                  "retry; report it if it persists")
        if self._error is not None:
            raise BadInputError(f"cannot listen on {self.host}:{self.port} ({self._error})",
                                "pick a free port with port=, e.g. port=8010") from None

    def stop(self, grace_s: float = 5) -> None:
        """Close the port and the kept-alive connections (answers in progress get grace_s)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            self._thread.join(grace_s + 5)

    def _run(self) -> None:
        import asyncio

        try:
            run = asyncio.run
            if os.environ.get("IDLE_EXPORT_GUARD_LOOP", "uvloop") == "uvloop":
                try:  # libuv's loop: less Python per request than asyncio's own (`serve` extra)
                    import uvloop

                    run = uvloop.run
                except ImportError:
                    pass
            run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported by start() or ends the thread
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        import asyncio

        import aiohttp
        from aiohttp import web

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"))
        app = web.Application()  # the body limit is _read_body's

        async def handle(request):
            return await self._handle(request, session, web)

        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, auto_decompress=False, shutdown_timeout=5,
                               read_bufsize=self.READ_BUFSIZE)
        try:
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await session.close()

    async def _handle(self, request, session, web):
        import asyncio  # loaded by _run (kept out of the module's imports: `--help` stays fast)

        def answer(status: int, message: str):
            return web.Response(status=status, body=error_body(message), content_type="application/json")

        held = [0]  # bytes of this request counted in self.in_flight, released however it ends
        try:
            try:
                if request.method == "POST" and INFER_PATH.match(request.path):
                    header_length = _streamable(request)
                    if header_length is not None:  # binary tensors: check the header, stream the rest
                        self._admit(request, held)
                        text = await request.content.readexactly(header_length)
                        await self._check_json(text)
                        body = _stream(text, request.content)
                    else:
                        body = await self._read_body(request, held)
                        await self._check_json(request_json(
                            body, request.headers.get("Inference-Header-Content-Length"),
                            request.headers.get("Content-Encoding"), self.limit))
                else:
                    body = await self._read_body(request, held)
            except Refused as r:
                if r.status == 503:
                    self.busy_refused += 1
                    return web.Response(status=503, body=error_body(r.message),
                                        content_type="application/json",
                                        headers={"Retry-After": "1", "Connection": "close"})
                return answer(r.status, r.message)
            except (asyncio.IncompleteReadError, ConnectionError):
                return answer(400, "the request body ended before its Content-Length")
            return await self._forward(request, body, session, web, answer)
        finally:
            self.in_flight -= held[0]

    async def _check_json(self, text: bytes) -> None:
        if len(text) > self.JSON_IN_THREAD:  # parse large JSON off the event loop
            await self._loop.run_in_executor(None, check_infer_request, text, self.limit)
        else:
            check_infer_request(text, self.limit)

    def _admit(self, request, held: list[int]) -> tuple[int, Refused]:
        """Refused(413) when the declared Content-Length is over the limit, else reserve it before
        reading (Refused 503 over the budget); the limit and its 413 for bodies without a length."""
        cap = self.limit + HEADER_SLACK
        too_big = Refused(413, f"the request body is over {cap:,} bytes, this server's limit (serve run "
                               "--http-max-input-size; binary tensors, as tritonclient sends by default, "
                               "are 4-6x smaller than JSON numbers)")
        if (request.content_length or 0) > cap:
            raise too_big
        self._reserve(request.content_length or 0, held)
        return cap, too_big

    def _reserve(self, total: int, held: list[int]) -> None:
        """Count this request as holding `total` bytes (held[0] are counted already); Refused(503)
        when that takes the guard over its budget while other requests are in flight."""
        more = total - held[0]
        if more <= 0:
            return
        if self.in_flight > held[0] and self.in_flight + more > self.budget:
            raise Refused(503, f"server busy: {self.in_flight:,} bytes of requests in flight, the most "
                               f"this server holds at once is {self.budget:,}; retry after a second")
        self.in_flight += more
        held[0] = total

    async def _forward(self, request, body, session, web, answer):
        import asyncio

        import aiohttp

        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if isinstance(body, bytes):
            data = _slices(body) if body else None
            if body:
                headers["Content-Length"] = str(len(body))
        else:  # streamed: as declared (aiohttp stops the body there)
            data = body
            headers["Content-Length"] = str(request.content_length)
        try:
            async with session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                       data=data, allow_redirects=False) as resp:
                data = await resp.read()
                status = 400 if is_parse_error(resp.status, data) else resp.status
                out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
                return web.Response(status=status, body=data, headers=out)
        except (asyncio.IncompleteReadError, ConnectionError):  # the client left mid-body
            return answer(400, "the request body ended before its Content-Length")
        except aiohttp.ClientError as e:
            return answer(503, f"Triton behind this server is not reachable ({type(e).__name__}); it is "
                               "stopping or has stopped")

    async def _read_body(self, request, held: list[int]) -> bytes:
        """The body, at most limit + HEADER_SLACK bytes (Refused 413 beyond, before reading it
        when Content-Length says so). Chunks joined once: aiohttp's request.read() grows a
        bytearray, ~3 ms for 4.8 MB."""
        cap, too_big = self._admit(request, held)
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(2**20):
            size += len(chunk)
            if size > cap:
                raise too_big
            self._reserve(size, held)  # chunked bodies: counted as they come
            chunks.append(chunk)
        return b"".join(chunks)


def _streamable(request) -> int | None:
    """The JSON header's length of a binary inference request the guard can check from its
    header alone and stream on to tritonserver as it arrives (None: read the whole body first).
    Streaming overlaps the client's upload with tritonserver's read, instead of one after the
    other (docs/reliability.md#server-limits, "The cost")."""
    if (request.headers.get("Content-Encoding") or "identity").strip().lower() != "identity":
        return None
    total = request.content_length
    try:
        n = int(request.headers.get("Inference-Header-Content-Length", ""))
    except ValueError:
        return None
    if total is None or not 0 <= n <= total:
        return None  # no length (chunked) or a header length past the body: the buffered path says so
    return n


async def _stream(header: bytes, content):
    """The checked JSON header, then the tensor bytes as they come from the client."""
    yield header
    async for chunk in content.iter_any():
        yield chunk


async def _slices(body: bytes, size: int = 256 * 2**10):
    """The body in 256 KiB pieces. Python 3.11's asyncio socket transport copies unsent data into
    one bytearray and deletes what the socket took from its front, so one 4.8 MB write to
    tritonserver cost ~6 ms in memmoves; pieces that wait for the socket cost ~2 ms."""
    view = memoryview(body)
    for start in range(0, len(body), size):
        yield view[start:start + size]
