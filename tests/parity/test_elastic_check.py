"""`check --keep-rate` on an elastic file: any rate against torch at that rate, on ONNX Runtime and
OpenVINO; rates a file cannot run are refused in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.parity.check import check_onnx
from tests.conftest import error_lines

runner = CliRunner()


@pytest.mark.parametrize("backend, rate", [("ort", 0.5), ("ort", 0.25), ("openvino", 0.6)])
def test_check_an_elastic_file_at_any_rate(tiny_ckpt, tiny_elastic_onnx, backend, rate):
    report = check_onnx(tiny_elastic_onnx, ckpt_path=tiny_ckpt, batch_sizes=(1, 3), input_sets=("photos",),
                        backend=backend, keep_rate=rate)
    assert report["passed"], report["cases"]
    assert report["keep_rate"] == rate
    assert all(c["selection"] == 1.0 and c["max_abs"] <= 1e-4 for c in report["cases"])


def test_a_rate_changes_what_is_checked(tiny_ckpt, tiny_elastic_onnx, tiny_folded_onnx):
    """The elastic file at 0.5 is not the fixed 0.7 file: --against at 0.5 fails on it."""
    report = check_onnx(tiny_elastic_onnx, against=tiny_folded_onnx, batch_sizes=(2,),
                        input_sets=("photos",), keep_rate=0.7)
    assert report["passed"]
    with pytest.raises(Exception, match="fixed-K export"):
        check_onnx(tiny_elastic_onnx, against=tiny_folded_onnx, batch_sizes=(2,), input_sets=("photos",),
                   keep_rate=0.5)


def test_check_cli_keep_rate(tiny_ckpt, tiny_elastic_onnx, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["check", str(tiny_elastic_onnx), "--ckpt", str(tiny_ckpt), "--keep-rate",
                                 "0.4", "--batch", "2", "--inputs", "noise", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["model"].startswith("deit_tiny keep 0.4, idle layers")


@pytest.mark.parametrize("which, rate, words", [
    ("fixed", "0.5", "fixed-K export (keep 0.7)"),
    ("elastic", "0.1", "would keep 0 of 196"),
    ("elastic", "1.5", "outside (0, 1]"),
])
def test_check_cli_refuses_rates_a_file_cannot_run(tiny_ckpt, tiny_elastic_onnx, tiny_folded_onnx, which,
                                                   rate, words):
    model = tiny_elastic_onnx if which == "elastic" else tiny_folded_onnx
    result = runner.invoke(app, ["check", str(model), "--ckpt", str(tiny_ckpt), "--keep-rate", rate,
                                 "--batch", "1", "--inputs", "noise"])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and words in lines[0] and "(hint: " in lines[0], result.stderr
