"""`idle-export lint`: the exported graphs pass, each rule fires on a small graph that breaks it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.onnx.lint import lint_file, lint_model

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _model(nodes, inits=(), inputs=None, outputs=None, opset=18):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model, **kw):
    return {(f["rule"], f["severity"]) for f in lint_model(model, **kw)}


def test_exported_idle_graph_passes_with_expect_idle(tiny_idle_onnx, tmp_path):
    out = tmp_path / "lint.json"
    result = run_cli("lint", tiny_idle_onnx, "--expect-idle", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["errors"] == 0
    assert report["ops"]["TopK"] == 9 and report["ops"]["ScatterElements"] == 9
    piped = run_cli("lint", tiny_idle_onnx, "--expect-idle", "--json", "-")  # stdout: the JSON alone
    assert piped.exit_code == 0 and json.loads(piped.stdout) == report
    assert "OK for TensorRT" in piped.stderr


def test_dense_graph_fails_expect_idle_but_passes_plain_lint(tiny_dense_onnx):
    assert run_cli("lint", tiny_dense_onnx).exit_code == 0
    result = run_cli("lint", tiny_dense_onnx, "--expect-idle")
    assert result.exit_code == 1
    assert "dense baseline" in result.output and "no TopK" in result.output


def test_not_an_onnx_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("hello")
    result = run_cli("lint", bad)
    assert result.exit_code == 2
    assert "is not an ONNX model" in result.output and "Traceback" not in result.output
    missing = run_cli("lint", tmp_path / "nope.onnx")
    assert missing.exit_code == 2 and "not found" in missing.output


def test_unsupported_and_custom_ops(tmp_path):
    m = _model([helper.make_node("Unique", ["x"], ["y"]),
                helper.make_node("FusedThing", ["x"], ["z"], domain="com.example")],
               outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "unsupported.onnx"
    onnx.save(m, path)
    result = run_cli("lint", path)
    assert result.exit_code == 1
    assert "Unique is not supported" in result.output and "custom op" in result.output
    assert lint_file(path)["errors"] == 2


def test_topk_k_rules():
    def topk(k_value=None, k_from_input=False, sorted_=1):
        nodes = [helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=1, sorted=sorted_)]
        inits = [] if k_from_input else [("k", np.array([k_value], np.int64))]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])]
        if k_from_input:
            inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
        return _model(nodes, inits, inputs=inputs)

    assert ("topk-k", "error") not in _rules(topk(4))
    assert ("topk-k", "error") in _rules(topk(4000))
    assert ("topk-k", "error") in _rules(topk(k_from_input=True))
    assert ("topk-k", "error") in _rules(topk(4, sorted_=0))


def test_scatter_with_reduction_is_refused():
    def scatter(reduction):
        return _model([helper.make_node("ScatterElements", ["x", "idx", "x"], ["y"], axis=1,
                                        reduction=reduction)],
                      [("idx", np.zeros((1, 8), np.int64))])

    assert ("scatter-reduction", "error") in _rules(scatter("add"))
    assert not any(r == "scatter-reduction" for r, _ in _rules(scatter("none")))


def test_shape_arithmetic_in_float_is_refused():
    m = _model([helper.make_node("Shape", ["x"], ["s"]),
                helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["sf", "half"], ["h"]),
                helper.make_node("Cast", ["h"], ["hi"], to=TensorProto.INT64),
                helper.make_node("Reshape", ["x", "hi"], ["y"])],
               [("half", np.array([1.0, 0.5], np.float32))])
    assert ("float-shape-math", "error") in _rules(m)


def test_dynamic_non_batch_dims_and_old_opset():
    m = _model([helper.make_node("Relu", ["x"], ["y"])],
               inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])], opset=13)
    rules = _rules(m)
    assert ("dynamic-dims", "error") in rules and ("opset", "warning") in rules


def test_mixed_half_float_inputs_are_refused():
    m = _model([helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
                helper.make_node("Div", ["xh", "x"], ["y"])])
    findings = lint_model(m)
    assert any(f["rule"] == "mixed-float" and "mixes float/float16" in f["message"] for f in findings)


def test_qdq_rules_zero_point_and_int32_bias():
    asym = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                   helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
                  [("s", np.float32(0.1)), ("zp", np.uint8(3))])
    rules = {f["message"].split(":")[0] for f in lint_model(asym) if f["rule"] == "qdq"}
    assert any("zero point" in r for r in rules) and any("UINT8" in r for r in rules)
    sym = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
                 [("s", np.float32(0.1)), ("zp", np.int8(0))])
    assert not [f for f in lint_model(sym) if f["rule"] == "qdq"]
    bias = _model([helper.make_node("DequantizeLinear", ["b", "s"], ["bf"]),
                   helper.make_node("Add", ["x", "bf"], ["y"])],
                  [("b", np.zeros(8, np.int32)), ("s", np.float32(0.1))])
    assert any("INT32" in f["message"] for f in lint_model(bias) if f["rule"] == "qdq")


@pytest.mark.parametrize("case", ["no-gather", "count"])
def test_expect_idle_pattern_checks(case):
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)]
    m = _model(nodes, [("k", np.array([2], np.int64))],
               outputs=[helper.make_tensor_value_info("v", TensorProto.FLOAT, None)])
    if case == "count":
        m.metadata_props.add(key="idle_export.idle_layers", value="[3, 4]")
    messages = " ".join(f["message"] for f in lint_model(m, expect_idle=True))
    assert "not the idle-layer pattern" in messages
    if case == "count":
        assert "2 idle layers but the graph has 1 TopK" in messages
