"""`bench --keep-rate`: one elastic file timed at several rates (one variant per rate, each with
its own FLOP ideal), and the per-call keep rate of the runners and api.open_model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export import api
from idle_export.bench.variants import flop_model
from idle_export.cli import app
from idle_export.onnx.metadata import OnnxMetadata
from tests.conftest import error_lines

runner = CliRunner()
FAST = ["--runs", "1", "--warmup", "1", "--min-time", "0.02", "--batch", "1,2"]


def test_bench_times_one_elastic_file_at_several_rates(tiny_elastic_onnx, tiny_dense_onnx, tmp_path):
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", str(tiny_elastic_onnx), str(tiny_dense_onnx), "--keep-rate",
                                 "0.5,0.7,1.0", "--backend", "ort,openvino", *FAST, "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["keep_rates"] == [0.5, 0.7, 1.0]
    spec = OnnxMetadata.read(tiny_elastic_onnx).spec
    for backend in ("ort", "openvino"):
        rows = [c for c in report["comparisons"] if c["backend"] == backend and c["batch"] == 1]
        assert [c["variant"] for c in rows] == [f"idle-folded-elastic@{r}" for r in ("0.5", "0.7", "1")]
        for c, rate in zip(rows, (0.5, 0.7, 1.0), strict=True):  # each rate's own FLOP ideal
            assert c["ideal"] == pytest.approx(flop_model(spec.at_rate(rate))["ideal"]["folded"])
            assert c["baseline"] == f"{backend}:dense" and c["speedup"] > 0
    assert "idle-folded-elastic@0.5" in result.stdout


def test_bench_keep_rate_needs_an_elastic_file(tiny_folded_onnx, tiny_dense_onnx):
    result = runner.invoke(app, ["bench", str(tiny_folded_onnx), str(tiny_dense_onnx), "--keep-rate", "0.5",
                                 *FAST])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "no target is elastic" in lines[0]


def test_open_model_takes_a_keep_rate_per_call(tiny_elastic_onnx, tiny_folded_onnx):
    from idle_export.data.inputs import input_set

    x = input_set("photos", 2, OnnxMetadata.read(tiny_elastic_onnx).spec)
    for backend in ("ort", "openvino"):
        with api.open_model(tiny_elastic_onnx, backend=backend) as m, \
                api.open_model(tiny_elastic_onnx, backend=backend, keep_rate=0.4) as at_04:
            default = m.infer({"images": x})["logits"]
            half = m.infer({"images": x, "keep_rate": 0.4})["logits"]
            again = m.infer({"images": x})["logits"]  # the call's rate does not stick
            assert np.array_equal(default, again) and not np.allclose(default, half)
            assert np.abs(half - at_04.infer({"images": x})["logits"]).max() <= 1e-5
    with api.open_model(tiny_folded_onnx) as fixed:
        assert np.abs(fixed.infer({"images": x})["logits"] - default).max() <= 1e-4
        with pytest.raises(Exception, match="fixed-K export"):
            fixed.infer({"images": x, "keep_rate": 0.4})
