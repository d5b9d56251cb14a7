"""Serving an elastic file (serve.elastic): keep_rate as an optional request input, no request
batched with another (max_batch_size 0), and a real server (pytriton, CPU) answering interleaved
requests at two rates, each against ONNX Runtime at its own rate."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from tests.serve.test_serve import Server, free_port, http_client, infer

pytest.importorskip("tritonclient.http",
                    reason="tritonclient[http] not installed (pip install idle-export[serve])")
runner = CliRunner()


@pytest.fixture(scope="module")
def repo(tiny_elastic_onnx, tiny_folded_onnx, tmp_path_factory):
    from idle_export.serve.repository import write_repository

    root = tmp_path_factory.mktemp("serve_elastic") / "model_repository"
    report = write_repository(tiny_elastic_onnx, root, name="tiny_elastic", max_batch=8)
    write_repository(tiny_folded_onnx, root, name="tiny_fixed", max_batch=8)
    return root, report


def test_repo_exposes_keep_rate_and_turns_the_batcher_off(repo):
    root, report = repo
    text = (root / "tiny_elastic" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in text and "dynamic_batching" not in text
    assert 'name: "keep_rate"' in text and "reshape: { shape: [  ] }" in text and "optional: true" in text
    assert report["inputs"][0]["dims"] == [-1, 3, 224, 224] and report["outputs"][0]["dims"] == [-1, 1000]
    assert report["validated_with_triton_protobuf"] and report["max_batch_size"] == 0
    assert any("never share a batch" in w for w in report["warnings"])
    assert "dynamic_batching" in (root / "tiny_fixed" / "config.pbtxt").read_text()  # unchanged


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    pytest.importorskip("pytriton", reason="nvidia-pytriton not installed (pip install idle-export[serve])")
    srv = Server(repo[0], free_port(), tmp_path_factory.mktemp("log") / "serve_elastic.err")
    try:
        srv.wait_ready(["tiny_elastic", "tiny_fixed"])
        yield srv
    finally:
        srv.kill()


def test_interleaved_requests_at_two_rates_each_match_their_own_rate(server, tiny_elastic_onnx):
    """Concurrent requests alternate 0.4 / 0.9 / no rate (the default 0.7): every answer is the
    model at its own rate, never at a neighbour's."""
    import tritonclient.http as httpclient

    from idle_export.data.inputs import builtin_photos, seeded_noise
    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.runtime.onnxruntime import OrtRunner

    spec = OnnxMetadata.read(tiny_elastic_onnx).spec
    x = np.concatenate([seeded_noise(6, spec, seed=2), builtin_photos(6, spec, seed=2)])
    rates = (0.4, 0.9, None)
    refs = {}
    with OrtRunner(tiny_elastic_onnx, threads=2) as r:
        for rate in rates:
            refs[rate] = r.infer({"images": x, "keep_rate": rate})["logits"]
    assert np.abs(refs[0.4] - refs[0.9]).max() > 1e-2  # the rates give different answers
    rng = np.random.default_rng(0)
    plan = [(rates[i % 3], rng.choice(len(x), size=int(rng.choice([1, 2, 3])), replace=False))
            for i in range(60)]
    local = threading.local()

    def send(item):
        rate, idx = item
        if not hasattr(local, "client"):
            local.client = http_client(server.url)
        inputs = [httpclient.InferInput("images", [len(idx), *x.shape[1:]], "FP32")]
        inputs[0].set_data_from_numpy(x[idx])
        if rate is not None:
            inputs.append(httpclient.InferInput("keep_rate", [1], "FP32"))
            inputs[1].set_data_from_numpy(np.asarray([rate], dtype=np.float32))
        return rate, idx, local.client.infer("tiny_elastic", inputs).as_numpy("logits")

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(send, plan))
    for rate, idx, out in results:
        assert np.abs(out - refs[rate][idx]).max() <= 1e-5, rate
    assert http_client(server.url).is_model_ready("tiny_fixed")
    assert infer(http_client(server.url), "tiny_fixed", x[:2]).shape == (2, 1000)


def test_query_keep_rate(server, tmp_path, tiny_elastic_onnx):
    from PIL import Image
    from skimage import data

    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    out = {}
    for rate in ("0.3", "1.0"):
        result = runner.invoke(app, ["serve", "query", server.url, str(photo), "--model", "tiny_elastic",
                                     "--keep-rate", rate, "--json", str(tmp_path / f"{rate}.json")])
        assert result.exit_code == 0, result.output
        out[rate] = json.loads((tmp_path / f"{rate}.json").read_text())
    assert out["0.3"]["keep_rate"] == 0.3
    assert out["0.3"]["results"][0]["top"][0]["logit"] != out["1.0"]["results"][0]["top"][0]["logit"]
    fixed = runner.invoke(app, ["serve", "query", server.url, str(photo), "--model", "tiny_fixed",
                                "--keep-rate", "0.5"])
    assert fixed.exit_code == 2 and "not an elastic export" in fixed.output
