"""idle_export/trt/plugin.py without a GPU: the refusals that name what is missing, and the graph
`trt --plugin` hands TensorRT's parser, made with a stand-in `tensorrt.plugin` (the one
tests/plugins/test_tensorrt_plugin.py checks against the 10.12+ API). The build itself runs on
a GPU machine only (scripts/gpu_acceptance.sh)."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.onnx import plugin_form as pf
from idle_export.onnx.io import load_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.runtime.onnxruntime import OrtRunner
from idle_export.trt import plugin as trt_plugin
from idle_export.trt.flavour import TrtInfo
from idle_export.trt.inputs import onnx_facts
from tests.onnx.plugin_graph import evaluate
from tests.plugins.test_tensorrt_plugin import fake_tensorrt, tp

LAYERS = list(range(3, 12))


@pytest.fixture(scope="module")
def plugin_model(tiny_folded_onnx):
    return pf.to_plugin_form(load_onnx(tiny_folded_onnx))


@pytest.fixture
def stand_in(monkeypatch):
    """A TensorRT 10.13 with tensorrt.plugin (no kernels are compiled: aot_impl is not called)."""
    trt, trtp, registry = fake_tensorrt("10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(tp, "_REGISTERED", {})
    return trt, registry


def test_refusals_name_what_is_missing(plugin_model, tiny_folded_onnx, monkeypatch, tmp_path):
    onnx_path = tmp_path / "p.onnx"
    with pytest.raises(BadInputError, match="no IdleSelect nodes"):
        trt_plugin.check_plugin_build(tiny_folded_onnx, load_onnx(tiny_folded_onnx), "fp16", None, None)
    with pytest.raises(BadInputError, match="TensorRT-RTX has no plugin layers"):
        trt_plugin.check_plugin_build(onnx_path, plugin_model, "fp16", None, "tensorrt_rtx")
    monkeypatch.setenv("IDLE_EXPORT_TRT", "tensorrt_rtx")
    with pytest.raises(BadInputError, match="TensorRT-RTX has no plugin layers"):
        trt_plugin.check_plugin_build(onnx_path, plugin_model, "fp32", None, None)
    monkeypatch.delenv("IDLE_EXPORT_TRT")
    with pytest.raises(BadInputError, match="target="):
        trt_plugin.check_plugin_build(onnx_path, plugin_model, "fp16", "sm89", None)
    with pytest.raises(BadInputError, match="FP32 or FP16"):
        trt_plugin.check_plugin_build(onnx_path, plugin_model, "int8", None, None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"tensorrt` >= 10\.12.*TensorRT-RTX has no plugin") as e:
        trt_plugin.check_plugin_build(onnx_path, plugin_model, "fp16", None, None)
    assert e.value.exit_code == 3
    old, old_p, _ = fake_tensorrt("10.8.0")
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", old_p)
    with pytest.raises(MissingDependencyError, match="too old.*TensorRT-RTX has no plugin layers"):
        trt_plugin.check_plugin_build(onnx_path, plugin_model, "fp16", None, None)


def test_with_tensorrt_but_no_gpu(plugin_model, stand_in, monkeypatch, tmp_path):
    monkeypatch.setattr(trt_plugin, "gpu_info", lambda: None)
    with pytest.raises(MissingDependencyError, match="for the GPU in this machine and there is none"):
        trt_plugin.check_plugin_build(tmp_path / "p.onnx", plugin_model, "fp16", None, None)
    monkeypatch.setattr(trt_plugin, "gpu_info", lambda: {"name": "GPU", "compute_capability": "sm90"})
    assert trt_plugin.check_plugin_build(tmp_path / "p.onnx", plugin_model, "fp16", None, None) == "tensorrt"


def test_the_graph_for_the_parser(plugin_model, stand_in, tiny_folded_onnx, tmp_path):
    trt, registry = stand_in
    info = TrtInfo(trt, "tensorrt", trt.__version__)
    facts = onnx_facts(plugin_model)
    echoed = []
    parsed, report, typed, entry = trt_plugin.plugin_graph_to_parse(
        info, plugin_model, facts, tmp_path / "p.fp32.engine", "fp32", True, echoed.append)
    assert parsed == tmp_path / "p.fp32.trtplugin.onnx" and report is None and not typed
    assert set(registry) == {"idle_export::IdleSelect", "idle_export::IdleScatter"}
    assert entry["ops"] == {"IdleSelect": 9, "IdleScatter": 9} and entry["aot"]
    assert entry["selection_outputs"] == [f"selection_layer{i}" for i in LAYERS]
    proto = onnx.load(str(parsed))
    assert not proto.functions  # else the parser imports the bodies instead of the plugins
    for node in pf.plugin_nodes(proto) + pf.plugin_nodes(proto, "IdleScatter"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"idle_export" and attrs["aot"] == 1
    # what TensorRT would run, with the plugins' numpy reference for the plugin layers
    from idle_export.data.inputs import input_set

    x = input_set("noise", 2, OnnxMetadata.of(plugin_model).spec, seed=3)
    out = evaluate(proto, x)
    with OrtRunner(tiny_folded_onnx, selection=True) as r:
        want = r.infer({"images": x})
    assert np.allclose(out["logits"], want["logits"], atol=1e-4, rtol=1e-4)
    for name in entry["selection_outputs"]:
        assert np.array_equal(np.sort(out[name], 1), np.sort(want[name], 1)), name


def test_strongly_typed_fp16_feeds_the_kernels_fp16(plugin_model, stand_in, tmp_path):
    trt, _ = stand_in
    info = TrtInfo(trt, "tensorrt", "11.0.0")  # TensorRT 11: strongly typed, no FP16 flag
    parsed, report, typed, _ = trt_plugin.plugin_graph_to_parse(
        info, plugin_model, onnx_facts(plugin_model), tmp_path / "p.engine", "fp16", False, print)
    assert typed and report["fp16_nodes"] > 0
    proto = onnx.load(str(parsed))
    assert OnnxMetadata.of(proto).precision == "fp16" and not proto.functions
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    for node in pf.plugin_nodes(proto):  # xn, x and w in FP16: the kernel accumulates in FP32
        assert [types.get(i) for i in node.input] == [onnx.TensorProto.FLOAT16] * 3, node.name


def test_standard_view_for_builds_without_the_plugin(plugin_model, tmp_path):
    model, inlined = trt_plugin.standard_view(plugin_model, plugin=False)
    assert inlined and not model.functions
    same, inlined = trt_plugin.standard_view(plugin_model, plugin=True)
    assert same is plugin_model and not inlined
    onnx_path = tmp_path / "p.onnx"
    parsed, entry = trt_plugin.standard_view_path(onnx_path, onnx_path, model, True,
                                                 tmp_path / "p.fp32.engine", print)
    assert parsed == tmp_path / "p.fp32.inlined.onnx" and entry is None
    assert sum(n.op_type == "TopK" for n in onnx.load(str(parsed)).graph.node) == 9
    other = tmp_path / "p.fp16.onnx"  # a pass already wrote the file to parse: nothing more
    assert trt_plugin.standard_view_path(other, onnx_path, model, True, tmp_path / "e", print) == (
        other, None)

