"""`trt --elastic`: the elastic file's integer form (keep_permille, an int64 shape input) and the
engines TensorRT-RTX builds from it here (no GPU needed to build)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.model.elastic_k import elastic_k
from idle_export.onnx.elastic import KEEP_PERMILLE_INPUT, k_model, to_integer_form
from idle_export.onnx.lint import lint_model
from idle_export.runtime.tensorrt import engine_keep_feed
from tests.conftest import error_lines

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed")
runner = CliRunner()


def _session(proto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def integer_form(tiny_elastic_onnx):
    return to_integer_form(onnx.load(tiny_elastic_onnx))


def test_integer_k_is_the_schedule_at_every_permille(integer_form):
    session = _session(k_model(integer_form))
    names = [o.name for o in session.get_outputs()]  # elastic_k_p1..p3
    for m in range(0, 1001):
        ks = session.run(names, {KEEP_PERMILLE_INPUT: np.asarray(m, dtype=np.int64)})
        assert [int(k[0]) for k in ks] == [elastic_k(196, m / 1000, p) for p in (1, 2, 3)], m


def test_integer_form_runs_like_the_float_form(integer_form, tiny_elastic_onnx):
    from idle_export.data.inputs import input_set
    from idle_export.onnx.metadata import OnnxMetadata

    x = input_set("photos", 2, OnnxMetadata.read(tiny_elastic_onnx).spec)
    as_float, as_int = _session(onnx.load(tiny_elastic_onnx)), _session(integer_form)
    assert [i.name for i in integer_form.graph.input] == ["images", KEEP_PERMILLE_INPUT]
    for rate in (0.25, 0.7, 1.0):
        want = as_float.run(["logits"], {"images": x, "keep_rate": np.asarray(rate, np.float32)})[0]
        got = as_int.run(["logits"], {"images": x, KEEP_PERMILLE_INPUT: np.asarray(round(rate * 1000))})[0]
        assert np.array_equal(got, want), rate


def test_lint_knows_the_elastic_forms(tiny_elastic_onnx, integer_form, tiny_folded_onnx):
    findings = lint_model(onnx.load(tiny_elastic_onnx), expect_idle=True)
    assert [f["severity"] for f in findings] == ["warning"] and findings[0]["rule"] == "elastic"
    assert "trt --elastic" in findings[0]["message"]
    assert lint_model(integer_form, expect_idle=True) == []
    broken = onnx.load(tiny_elastic_onnx)  # a TopK fed a constant K in a file declaring the form
    topk = next(n for n in broken.graph.node if n.op_type == "TopK")
    topk.input[1] = next(n for n in onnx.load(tiny_folded_onnx).graph.node if n.op_type == "TopK").input[1]
    broken.graph.initializer.extend(t for t in onnx.load(tiny_folded_onnx).graph.initializer
                                    if t.name == topk.input[1])
    assert any(f["rule"] == "elastic" and f["severity"] == "error" for f in lint_model(broken))


@needs_rtx
@pytest.mark.trt
@pytest.mark.parametrize("precision, keep_range", [("fp16", "0.3:0.7:1"), ("fp32", None)])
def test_rtx_builds_elastic_engines(tiny_elastic_onnx, tmp_path, precision, keep_range):
    from idle_export.onnx.fp16 import precision_summary

    engine = tmp_path / f"e.{precision}.engine"
    result = runner.invoke(app, ["trt", str(tiny_elastic_onnx), f"--{precision}", "--elastic", "--profile",
                                 "1:2:4", "--target", "sm89", "--flavour", "tensorrt_rtx", "-o", str(engine),
                                 *(["--keep-range", keep_range] if keep_range else [])])
    assert result.exit_code == 0, result.output
    side = json.loads(engine.with_name(engine.name + ".json").read_text())
    lo, opt, hi = (300, 700, 1000) if keep_range else (180, 700, 1000)
    assert side["elastic"] == {"input": KEEP_PERMILLE_INPUT, "scale": 1000, "min": lo, "opt": opt, "max": hi,
                               "default": 700}
    io = {t["name"]: t for t in side["io"]}
    assert io[KEEP_PERMILLE_INPUT] == {"name": KEEP_PERMILLE_INPUT, "dtype": "int64", "shape": [],
                                      "mode": "input"}
    assert f"keep_permille {lo}:{opt}:{hi}" in result.output
    assert f"--maxShapes=images:4x3x224x224,keep_permille:{hi}" in side["trtexec"]
    parsed = onnx.load(engine.with_name(side["built_from"]["path"]))
    assert KEEP_PERMILLE_INPUT in [i.name for i in parsed.graph.input]
    if precision == "fp16":  # the FP16 graph keeps the K computation integer and the scores FP32
        summary = precision_summary(parsed)
        assert set(summary["topk_inputs"]) == {"float"} and len(summary["topk_inputs"]) == 9
        tables = [t for t in parsed.graph.initializer if t.name.startswith("elastic_thresholds")]
        assert len(tables) == 3 and {t.data_type for t in tables} == {onnx.TensorProto.INT64}
    assert engine_keep_feed(side, 0.5, "e")[KEEP_PERMILLE_INPUT] == 500
    assert engine_keep_feed(side, None, "e")[KEEP_PERMILLE_INPUT] == 700


@pytest.mark.parametrize("args, words", [
    (["--keep-range", "0.3:0.7:1"], "add --elastic"),
    (["--elastic", "--keep-range", "0.7:0.3:1"], "is not MIN:OPT:MAX"),
])
def test_trt_elastic_bad_options(tiny_elastic_onnx, tmp_path, args, words):
    result = runner.invoke(app, ["trt", str(tiny_elastic_onnx), "-o", str(tmp_path / "x.engine"), *args])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_trt_elastic_refuses_a_fixed_file(tiny_folded_onnx, tmp_path):
    result = runner.invoke(app, ["trt", str(tiny_folded_onnx), "--elastic", "-o", str(tmp_path / "x.engine")])
    assert result.exit_code == 2 and "has a fixed K" in result.stderr, result.output


def test_engine_keep_feed_ranges():
    side = {"elastic": {"input": KEEP_PERMILLE_INPUT, "scale": 1000, "min": 300, "opt": 700, "max": 1000,
                        "default": 700}}
    with pytest.raises(Exception, match="outside e's range 0.3..1"):
        engine_keep_feed(side, 0.2, "e")
    fixed = {"model": {"idle_export.keep_rate": "0.7"}}
    assert engine_keep_feed(fixed, 0.7, "f") == {} and engine_keep_feed(fixed, None, "f") == {}
    with pytest.raises(Exception, match="fixed-K engine"):
        engine_keep_feed(fixed, 0.5, "f")
