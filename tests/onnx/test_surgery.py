"""The FP16 pass for strongly typed builds: what stays FP32/INT64, and that the result runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from idle_export.errors import BadInputError
from idle_export.onnx.fp16 import convert_fp16, fp16_onnx, precision_summary, score_path_nodes
from idle_export.onnx.graph import mixed_float_inputs, producers, tensor_types
from idle_export.onnx.io import load_onnx as load


@pytest.fixture(scope="module")
def tiny_fp16(tiny_idle_onnx, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fp16") / "tiny_idle.fp16.onnx"
    report = fp16_onnx(tiny_idle_onnx, dst)
    return dst, report


def _score_graph():
    """scores = (xW_q+b)·(xW_k+b)ᵀ / H → TopK, like one idle layer's selection."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 4])
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q_proj"),
        helper.make_node("Add", ["q0", "bias"], ["q"], name="q_bias"),
        helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k_proj"),
        helper.make_node("Add", ["k0", "bias"], ["k"], name="k_bias"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
        helper.make_node("MatMul", ["q", "kt"], ["s0"], name="score_mm"),
        helper.make_node("ReduceMean", ["s0", "ax"], ["s1"], keepdims=0, name="score_mean"),
        helper.make_node("Div", ["s1", "h"], ["s"], name="score_div"),
        helper.make_node("TopK", ["s", "kk"], ["v", "idx"], axis=1, name="topk"),
        helper.make_node("Relu", ["k"], ["y"], name="use_keys"),
    ]
    inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "wq"),
             numpy_helper.from_array(np.ones((4, 4), np.float32), "wk"),
             numpy_helper.from_array(np.zeros(4, np.float32), "bias"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"),
             numpy_helper.from_array(np.float32(2.0), "h"),
             numpy_helper.from_array(np.array([2], np.int64), "kk")]
    outs = [helper.make_tensor_value_info("idx", TensorProto.INT64, None),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_score_walk_stops_at_the_projections():
    keep = score_path_nodes(_score_graph())
    assert keep == {"k_t", "score_mm", "score_mean", "score_div", "topk"}


def test_small_graph_converts_with_casts_on_the_boundaries():
    model, report = convert_fp16(_score_graph())
    types = tensor_types(model)
    made_by = producers(model)
    assert types[made_by["s"].input[0]] == TensorProto.FLOAT  # score arithmetic in FP32
    assert types["k"] == TensorProto.FLOAT16 and types["y"] == TensorProto.FLOAT  # output kept FP32
    assert {i.data_type for i in model.graph.initializer if i.name.startswith("w")} == {TensorProto.FLOAT16}
    assert "h" in {i.name for i in model.graph.initializer}  # the /H divisor stays FP32 for the FP32 Div
    assert mixed_float_inputs(model) == []
    assert report["fp16_nodes"] == 5  # 2 projections, 2 bias adds, Relu


def test_fp16_pass_keeps_scores_topk_and_indices_fp32_int64(tiny_fp16):
    path, report = tiny_fp16
    model = load(path)
    s = precision_summary(model)
    assert s["topk_inputs"] == ["float"] * 9  # scores ranked in FP32
    assert s["topk_indices"] == ["int64"] * 9
    assert set(s["index_inputs"]) == {"int64"} and len(s["index_inputs"]) == 36  # 27 gathers + 9 scatters
    assert s["layernorm"] == ["float16"] * 25  # LayerNormalization stays one op, in FP16
    assert s["inputs"] == {"images": "float"} and s["outputs"] == {"logits": "float"}
    assert s["float_nodes"]["float16"] > 5 * s["float_nodes"]["float"]
    # the score MatMul (q_cls·kᵀ) of every layer is on the FP32 side
    types, made_by = tensor_types(model), producers(model)
    for node in model.graph.node:
        if node.op_type == "TopK":
            div = made_by[node.input[0]]
            matmul = made_by[made_by[div.input[0]].input[0]]
            assert matmul.op_type == "MatMul" and all(types[i] == TensorProto.FLOAT for i in matmul.input)
    assert not mixed_float_inputs(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["idle_export.precision"]) == "fp16" and "idle_export.keep_k" in meta
    assert len(report["fp32_nodes"]) == 9 * 6 and report["clipped_weights"] == 0


def test_fp16_dense_graph_is_fp16_but_its_io(tiny_dense_onnx, tmp_path):
    report = fp16_onnx(tiny_dense_onnx, tmp_path / "dense.fp16.onnx")
    s = precision_summary(load(tmp_path / "dense.fp16.onnx"))
    assert report["fp32_nodes"] == [] and report["casts"] == 2
    assert s["float_nodes"].get("float", 0) == 1  # the output Cast


def test_fp16_graph_runs_on_onnxruntime_and_agrees(tiny_fp16, tiny_idle_onnx):
    from idle_export.data.inputs import builtin_photos
    from idle_export.model.config import TOLERANCES
    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.parity.compare import compare_runners
    from idle_export.runtime.onnxruntime import OrtRunner

    spec = OnnxMetadata.read(tiny_idle_onnx).spec
    images = builtin_photos(8, spec, seed=1)
    r = compare_runners(OrtRunner(tiny_fp16[0], selection=True), OrtRunner(tiny_idle_onnx, selection=True),
                        {"photos": images}, [8], TOLERANCES["fp16"])
    case = r["cases"][0]
    assert case["max_abs"] < 0.05 and case["top1"] == 1.0
    assert case["selection"] >= 0.7  # random weights: near-flat scores, some FP16 flips


def test_trained_model_fp16_agrees_with_fp32(photos10_idle_onnx, tmp_path):
    """The real check: a trained model's FP16 graph keeps top-1 and nearly all selections."""
    from idle_export.data.inputs import builtin_photos
    from idle_export.model.config import TOLERANCES
    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.parity.compare import compare_runners
    from idle_export.runtime.onnxruntime import OrtRunner

    dst = tmp_path / "p10.fp16.onnx"
    fp16_onnx(photos10_idle_onnx, dst)
    spec = OnnxMetadata.read(photos10_idle_onnx).spec
    r = compare_runners(OrtRunner(dst, selection=True), OrtRunner(photos10_idle_onnx, selection=True),
                        {"photos": builtin_photos(32, spec, seed=1)}, [32], TOLERANCES["fp16"])
    case = r["cases"][0]
    assert case["top1"] == 1.0 and case["max_abs"] < 0.05
    assert case["selection"] >= 0.9, case["selection_per_layer"]


def test_already_fp16_or_not_onnx_is_refused(tiny_fp16, tmp_path):
    with pytest.raises(BadInputError, match="already has FP16 weights"):
        fp16_onnx(tiny_fp16[0], tmp_path / "again.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 not onnx")
    with pytest.raises(BadInputError, match="not an ONNX model"):
        fp16_onnx(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "again.onnx").exists()


def test_checker_accepts_the_fp16_graph(tiny_fp16):
    onnx.checker.check_model(str(tiny_fp16[0]), full_check=True)
