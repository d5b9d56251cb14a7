"""The request guard of `serve run` (serve/guard.py) without a server: what it reads of a request,
what it refuses, how big a request may be by default. tests/serve/test_server_reliability.py sends
the same requests to a real server."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idle_export.cli.options import byte_size
from idle_export.serve.guard import Refused, check_infer_request, is_parse_error, request_json

LIMIT = 2**20


def refused(fn, *args) -> tuple[int, str] | None:
    try:
        fn(*args)
    except Refused as r:
        return r.status, r.message
    return None


def doc(shape, datatype="FP32", **extra) -> bytes:
    tensor = {"name": "images", "shape": shape, "datatype": datatype, **extra}
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize("shape, datatype, fits", [
    ([1, 3, 224, 224], "FP32", True),                 # 602 kB
    ([2, 3, 224, 224], "FP32", False),                # 1.2 MB > 1 MiB
    ([2, 3, 224, 224], "FP16", True), ([4, 3, 224, 224], "FP16", False),
    ([1, 3, 224, 224], "FP64", False),
    ([2**18], "FP32", True), ([2**18 + 1], "FP32", False),   # the bound itself
    ([2**20], "UINT8", True), ([2**20 + 1], "BOOL", False),
    ([2**18 + 1], "BYTES", False),                    # BYTES elements count 4 bytes at least
    ([2**20 + 1], "??", False),                       # an unknown type counts 1 byte an element
    ([0, 10**30], "FP32", True),                      # nothing declared
    ([10**30, 10**30], "FP32", False),                # no overflow (Python integers)
])
def test_declared_bytes_are_bounded(shape, datatype, fits):
    got = refused(check_infer_request, doc(shape, datatype), LIMIT)
    assert (got is None) == fits, got
    if not fits:
        assert got[0] == 400 and "serve run --http-max-input-size" in got[1] and str(shape) in got[1]


def test_the_sum_over_inputs_is_bounded():
    def inputs(names):
        tensors = [{"name": n, "shape": [2**17], "datatype": "FP32"} for n in names]
        return json.dumps({"inputs": tensors}).encode()

    two, three = inputs("ab"), inputs("abc")
    assert refused(check_infer_request, two, LIMIT) is None
    assert "input 'c' declares shape [131072]" in refused(check_infer_request, three, LIMIT)[1]


@pytest.mark.parametrize("body, says", [
    (b"{", "failed to parse the request JSON buffer"),
    (b"\xff\xfe", "failed to parse the request JSON buffer"),
    (b"[" * 50_000, "failed to parse the request JSON buffer"),
    (b"[]", "Unable to parse 'inputs'"),
    (b'{"inputs": {}}', "Unable to parse 'inputs'"),
    (b'{"inputs": [null]}', "input 0 is not a JSON object"),
    (doc(None), "Unable to parse 'shape' of input 'images'"),
    (doc([1, -3]), "Unable to parse 'shape'"),
    (doc([1, 2.0]), "Unable to parse 'shape'"),
    (doc([1, True]), "Unable to parse 'shape'"),
    (doc("1,3"), "Unable to parse 'shape'"),
])
def test_unreadable_requests_get_400_in_tritons_words(body, says):
    status, message = refused(check_infer_request, body, LIMIT)
    assert status == 400 and says in message


def test_what_triton_checks_is_passed_on():
    """Names, types, data and shapes against the model are Triton's: the guard lets them through."""
    for body in (b"", b"  ", doc([1, 3, 2, 2], "XX"), doc([1, 3, 2, 2], data=["a"]),
                 json.dumps({"inputs": [{"shape": [1]}]}).encode(), b'{"inputs": []}'):
        assert refused(check_infer_request, body, LIMIT) is None, body


def test_binary_requests_are_read_up_to_their_header():
    header = doc([100_000_000, 3, 224, 224], parameters={"binary_data_size": 40})
    body = header + bytes(40)
    assert request_json(body, str(len(header)), None, LIMIT) == header
    assert refused(check_infer_request, request_json(body, str(len(header)), None, LIMIT), LIMIT)[0] == 400
    for bad in ("-1", "x", str(len(body) + 1)):
        assert refused(request_json, body, bad, None, LIMIT)[0] == 400


@pytest.mark.parametrize("encoding, pack", [("gzip", gzip.compress), ("deflate", zlib.compress),
                                            ("GZip", gzip.compress)])
def test_compressed_bodies_are_inflated_within_the_limit(encoding, pack):
    body = doc([1, 3, 224, 224], data=[0.0] * 10)
    assert request_json(pack(body), None, encoding, LIMIT) == body
    bomb = pack(b" " * (4 * LIMIT))  # 4 MiB of spaces, ~4 kB packed
    assert len(bomb) < 10_000
    status, message = refused(request_json, bomb, None, encoding, LIMIT)
    assert status == 413 and "inflates to more than" in message
    assert refused(request_json, b"not packed", None, encoding, LIMIT)[0] == 400


def test_unknown_encodings_are_refused():
    assert refused(request_json, b"{}", None, "br", LIMIT) == (400, "unsupported Content-Encoding 'br': use "
                                                                     "gzip, deflate or none")
    assert request_json(b"{}", None, "identity", LIMIT) == b"{}"


def test_only_tritons_request_parse_errors_become_400():
    assert is_parse_error(500, b'{"error":"failed to parse the request JSON buffer: x"}')
    assert is_parse_error(500, b'{"error":"Unable to parse \'data\': Shape does not match"}')
    assert not is_parse_error(500, b'{"error":"onnx runtime error 6: ..."}')  # a model failure stays 500
    assert not is_parse_error(400, b'{"error":"Unable to parse"}')
    assert not is_parse_error(500, b"not json")
    assert not is_parse_error(500, b"[1]")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                  st.sampled_from(["inputs", "shape", "name", "datatype", "data"]), c,
                                  max_size=4), max_leaves=20).map(lambda v: json.dumps(v).encode())),
       st.one_of(st.none(), st.sampled_from(["gzip", "deflate", "x"])),
       st.one_of(st.none(), st.integers(-5, 400).map(str)))
def test_any_body_is_passed_on_or_refused_with_a_status(body, encoding, header_length):
    try:
        check_infer_request(request_json(body, header_length, encoding, LIMIT), LIMIT)
    except Refused as r:
        assert r.status in (400, 413) and r.message and "\n" not in r.message


def test_default_limit_fits_every_served_models_full_batch(tiny_idle_onnx, tmp_path):
    from idle_export.serve.reader import read_repository
    from idle_export.serve.repository import write_repository
    from idle_export.serve.server import input_limit

    write_repository(tiny_idle_onnx, tmp_path / "repo", name="small", max_batch=8)
    write_repository(tiny_idle_onnx, tmp_path / "repo", name="big", max_batch=256)
    models = read_repository(tmp_path / "repo")
    full = 256 * 3 * 224 * 224 * 4  # 154 MB: the big model's full batch, binary
    assert input_limit(models[:1] if models[0].name == "small" else models[1:], None) == (64 * 2**20, [])
    assert input_limit(models, None) == (full, [])
    limit, warnings = input_limit(models, 64 * 2**20)
    assert limit == 64 * 2**20 and warnings == ["--http-max-input-size 67108864 refuses full batches of "
                                                "big (batches over 111, max batch 256)"]


@pytest.mark.parametrize("text, value", [("67108864", 2**26), ("64MiB", 2**26), ("64 mb", 2**26),
                                         ("512k", 2**19), ("1G", 2**30), ("4096B", 4096)])
def test_sizes_take_binary_units(text, value):
    assert byte_size(text, "--http-max-input-size") == value
