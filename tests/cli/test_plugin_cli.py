"""The plugin form through the real CLI: `onnx --plugin`, `check --against` the standard export,
`lint`, `trt` with and without `--plugin`, `bench`, and the refusals (exit codes, no files)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.runtime.onnxruntime import OrtRunner

runner = CliRunner()
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed")


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def json_of(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.fixture(scope="module")
def plugin_onnx(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin_cli") / "tiny_plugin.onnx"
    result = run_cli("onnx", tiny_ckpt, "--plugin", "-o", out, "--json", "-")
    assert result.exit_code == 0, result.output
    assert "plugin form, 9 IdleSelect + 9 IdleScatter" in result.output
    assert json_of(result)["ops"]["IdleSelect"] == 9
    return out


def test_export_has_one_node_per_layer_and_runs_in_onnxruntime(plugin_onnx):
    proto = onnx.load(str(plugin_onnx))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert "TopK" not in ops and ops["IdleSelect"] == 9 and ops["IdleScatter"] == 9
    assert sorted(f.name for f in proto.functions) == ["IdleScatter", "IdleSelect"]
    with OrtRunner(plugin_onnx, selection=True) as r:
        out = r.infer({"images": np.zeros((2, 3, 224, 224), np.float32)})
    assert out["logits"].shape == (2, 1000) and out["selection_layer3"].shape == (2, 137)


def test_check_against_the_standard_export_is_exact(plugin_onnx, tiny_folded_onnx):
    result = run_cli("check", plugin_onnx, "--against", tiny_folded_onnx, "--batch", "1,3",
                     "--json", "-")
    assert result.exit_code == 0, result.output
    report = json_of(result)
    assert report["passed"] and len(report["cases"]) == 4  # noise and photos, batch 1 and 3
    for case in report["cases"]:
        assert case["max_abs"] == 0.0 and case["selection"] == 1.0 and case["selection_ties"] == 0
        assert len(case["selection_per_layer"]) == 9


def test_lint_knows_the_plugin_form(plugin_onnx):
    result = run_cli("lint", plugin_onnx, "--expect-idle", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json_of(result)
    assert report["passed"] and report["form"] == "plugin" and not report["findings"]
    assert "IdleSelect 9, IdleScatter 9" in result.output


def test_trt_plugin_without_tensorrt_names_what_is_missing(plugin_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without `tensorrt`
    engine = tmp_path / "p.engine"
    result = run_cli("trt", plugin_onnx, "--plugin", "-o", engine)
    assert result.exit_code == 3, result.output
    assert "`tensorrt` >= 10.12" in result.output and "TensorRT-RTX has no plugin layers" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (("--flavour", "tensorrt_rtx"), "TensorRT-RTX has no plugin layers"),
    (("--target", "sm89"), "no --target cross-build"),
    (("--int8",), "FP32 or FP16 engines"),
])
def test_trt_plugin_refusals(plugin_onnx, tmp_path, args, message):
    result = run_cli("trt", plugin_onnx, "--plugin", *args, "-o", tmp_path / "p.engine")
    assert result.exit_code == 2, result.output
    assert message in result.output and not list(tmp_path.iterdir())


def test_trt_plugin_needs_the_plugin_form(tiny_folded_onnx, tmp_path):
    result = run_cli("trt", tiny_folded_onnx, "--plugin", "-o", tmp_path / "p.engine")
    assert result.exit_code == 2 and "no IdleSelect nodes" in result.output


@needs_rtx
def test_tensorrt_without_the_plugin_takes_the_file(plugin_onnx, tmp_path):
    import tensorrt_rtx as trt

    # the file as it is: the parser imports the function bodies (TopK layers, no plugin layers)
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(plugin_onnx)), parser.get_error(0).desc()
    kinds = Counter(network.get_layer(i).type for i in range(network.num_layers))
    assert kinds[trt.LayerType.TOPK] == 9
    # and `idle-export trt` builds it (from the inlined graph, so layer names match the nodes)
    engine = tmp_path / "p.engine"
    result = run_cli("trt", plugin_onnx, "--fp32", "--target", "sm89", "--flavour", "tensorrt_rtx",
                     "--profile", "1:1:2", "-o", engine, "--json", "-")
    assert result.exit_code == 0, result.output
    side = json_of(result)
    assert side["built_from"]["path"] == "p.inlined.onnx" and side["plugin"] is None
    assert engine.stat().st_size > 1e6


def test_bench_runs_and_labels_the_plugin_form(plugin_onnx, tiny_folded_onnx, tiny_dense_onnx):
    result = run_cli("bench", plugin_onnx, tiny_folded_onnx, tiny_dense_onnx, "--batch", "1",
                     "--runs", "1", "--warmup", "1", "--min-time", "0.01", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json_of(result)
    rows = {r["variant"]: r for r in report["results"]}
    assert {"idle-plugin", "idle-folded", "dense"} <= set(rows)
    assert all(rows[v]["images_per_s"] > 0 for v in rows)


@pytest.mark.parametrize("args, message", [
    (("--scores", "official"), "--plugin computes folded scores"),
    (("--dense",), "the dense baseline has none"),
])
def test_export_refusals(tiny_ckpt, tmp_path, args, message):
    result = run_cli("onnx", tiny_ckpt, "--plugin", *args, "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_calibrate_takes_the_standard_export(plugin_onnx, tmp_path):
    result = run_cli("calibrate", plugin_onnx, "-o", tmp_path / "x.int8.onnx")
    assert result.exit_code == 2 and "plugin form" in result.output
    assert not list(tmp_path.iterdir())
