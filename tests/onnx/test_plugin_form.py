"""The plugin form (idle_export/onnx/plugin_form.py): the pass over the standard export, the
model-local functions, ONNX Runtime on both forms, the inlined view, the copy TensorRT's parser
gets with --plugin, and that copy run with the plugins' own implementations (numpy reference;
the Triton kernels in the interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from idle_export.plugins.spec import DOMAIN

from idle_export.errors import BadInputError
from idle_export.onnx import plugin_form as pf
from idle_export.onnx.io import load_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.runtime.onnxruntime import OrtRunner
from tests.conftest import REPO
from tests.onnx.plugin_graph import evaluate

KEEP_K = [137, 137, 137, 96, 96, 96, 67, 67, 67]
LAYERS = list(range(3, 12))
SELECTION_OPS = {"TopK", "GatherElements", "ScatterElements"}


def attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.fixture(scope="module")
def standard(tiny_folded_onnx):
    return load_onnx(tiny_folded_onnx)


@pytest.fixture(scope="module")
def plugin_file(standard, tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "tiny_plugin.onnx"
    onnx.save(pf.to_plugin_form(standard), str(path))
    return path


@pytest.fixture(scope="module")
def images(tiny_folded_onnx):
    spec = OnnxMetadata.read(tiny_folded_onnx).spec
    from idle_export.data.inputs import input_set

    return input_set("photos", 3, spec, seed=1)


@pytest.fixture(scope="module")
def ort_standard(tiny_folded_onnx, images):
    with OrtRunner(tiny_folded_onnx, selection=True) as r:
        return r.infer({"images": images})


def test_one_node_per_layer_and_one_function_per_op(plugin_file, standard):
    proto = load_onnx(plugin_file)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["IdleSelect"] == ops["IdleScatter"] == 9
    assert not SELECTION_OPS & set(ops)  # the main graph has no TopK, gathers or scatters
    selects, scatters = pf.plugin_nodes(proto), pf.plugin_nodes(proto, "IdleScatter")
    assert {n.domain for n in selects + scatters} == {DOMAIN}
    assert [attr(n, "k") for n in selects] == KEEP_K
    assert [attr(n, "layer") for n in selects] == LAYERS == [attr(n, "layer") for n in scatters]
    # w [B, C] for the kernel: the folded query squeezed from [B, 1, C]
    made_by = {o: n for n in proto.graph.node for o in n.output}
    assert all(made_by[n.input[2]].op_type == "Squeeze" for n in selects)
    assert all(made_by[n.input[0]].op_type == "LayerNormalization" for n in selects)
    # ONNX names a function by domain and name: one function per op serves every layer
    assert [(f.domain, f.name, list(f.attribute)) for f in proto.functions] == [
        (DOMAIN, "IdleSelect", ["k", "layer"]), (DOMAIN, "IdleScatter", ["layer"])]
    body = [Counter(n.op_type for n in f.node) for f in proto.functions]
    assert body[0]["TopK"] == 1 and body[0]["GatherElements"] == 2 and body[1]["ScatterElements"] == 1
    assert (DOMAIN, 1) in {(o.domain, o.version) for o in proto.opset_import}
    meta, before = OnnxMetadata.of(proto), OnnxMetadata.of(standard)
    assert meta.form == "plugin" and before.form == "standard"
    assert {k: v for k, v in meta.props.items() if k != "idle_export.form"} == dict(before.props)
    onnx.checker.check_model(proto, full_check=True)
    # only the selection subgraphs left the main graph (one score MatMul per layer among them)
    gone = Counter(n.op_type for n in standard.graph.node
                   if n.name not in {m.name for m in proto.graph.node})
    assert gone["TopK"] == 9 and gone["MatMul"] == 9 and gone["ScatterElements"] == 9
    assert set(gone) <= SELECTION_OPS | {"MatMul", "Transpose", "Slice", "Squeeze", "Add", "Concat",
                                         "Expand", "Shape", "Unsqueeze"}


def test_onnxruntime_runs_both_forms_identically(plugin_file, images, ort_standard):
    with OrtRunner(plugin_file, selection=True) as r:  # ORT inlines the model-local functions
        out = r.infer({"images": images})
    assert sorted(out) == sorted(ort_standard) and len(out) == 1 + len(LAYERS)
    for name, value in ort_standard.items():
        assert np.array_equal(out[name], value), name  # bit for bit, selections included


def test_speed_passes_see_the_same_graph(plugin_file, tiny_folded_onnx, images):
    outs = []
    for path in (tiny_folded_onnx, plugin_file):
        with OrtRunner(path, selection=True, optimize=True) as r:
            outs.append(r.infer({"images": images}))
    for name in outs[0]:
        assert np.array_equal(outs[0][name], outs[1][name]), name


def test_inlined_view_is_the_standard_graph(plugin_file, images, ort_standard):
    flat = pf.inline(load_onnx(plugin_file))
    ops = Counter(n.op_type for n in flat.graph.node)
    assert not flat.functions and "IdleSelect" not in ops and ops["TopK"] == 9
    assert DOMAIN not in {o.domain for o in flat.opset_import}
    assert OnnxMetadata.of(flat).form == "standard" and not pf.is_plugin_form(flat)
    import onnxruntime as ort

    sess = ort.InferenceSession(flat.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(["logits"], {"images": images})[0], ort_standard["logits"])


def test_the_copy_for_tensorrt_runs_with_the_reference_ops(plugin_file, images, ort_standard):
    trt_copy = pf.for_tensorrt_plugin(load_onnx(plugin_file))
    assert not trt_copy.functions
    for node in pf.plugin_nodes(trt_copy) + pf.plugin_nodes(trt_copy, "IdleScatter"):
        assert attr(node, "plugin_namespace") == b"idle_export" and attr(node, "aot") == 1
    names = pf.add_selection_outputs(trt_copy, [f"selection_layer{i}" for i in LAYERS])
    out = evaluate(trt_copy, images)  # onnx.reference + plugins.reference for the plugin nodes
    assert np.allclose(out["logits"], ort_standard["logits"], atol=1e-4, rtol=1e-4)
    for name in names:  # the same kept patches (as sets: TopK's order is not part of the contract)
        assert np.array_equal(np.sort(out[name], 1), np.sort(ort_standard[name], 1)), name


def test_the_copy_for_tensorrt_runs_with_the_triton_kernels(plugin_file, images, ort_standard,
                                                            tmp_path):
    trt_copy = pf.for_tensorrt_plugin(load_onnx(plugin_file))
    names = pf.add_selection_outputs(trt_copy, [f"selection_layer{i}" for i in LAYERS])
    onnx.save(trt_copy, str(tmp_path / "trt.onnx"))
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "tests.onnx.plugin_graph", tmp_path / "trt.onnx",
                           tmp_path / "images.npy", tmp_path / "out.npz", "kernels"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    assert np.allclose(out["logits"], ort_standard["logits"], atol=1e-4, rtol=1e-4)
    for name in names:
        assert np.array_equal(np.sort(out[name], 1), np.sort(ort_standard[name], 1)), name


def _mutated(standard, change):
    proto = onnx.ModelProto()
    proto.CopyFrom(standard)
    change(proto)
    return proto


def test_anything_but_the_folded_selection_is_refused(standard):
    def smallest(proto):
        topk = next(n for n in proto.graph.node if n.op_type == "TopK")
        next(a for a in topk.attribute if a.name == "largest").i = 0

    def extra_reader(proto):  # a fourth reader of the expanded index (the official keys gather)
        gather = next(n for n in proto.graph.node if n.op_type == "GatherElements")
        proto.graph.node.append(onnx.helper.make_node("GatherElements", [gather.input[0], gather.input[1]],
                                                      ["extra"], axis=1))
        proto.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, None))

    for change, why in ((smallest, "TopK needs"), (extra_reader, "two GatherElements")):
        with pytest.raises(BadInputError, match=why):
            pf.to_plugin_form(_mutated(standard, change))
    with pytest.raises(BadInputError, match="already in the plugin form"):
        pf.to_plugin_form(pf.to_plugin_form(standard))

    def no_selection(proto):  # the dense twin has no TopK
        del proto.graph.node[:]
        proto.graph.node.append(onnx.helper.make_node("Identity", ["images"], ["logits"]))
    with pytest.raises(BadInputError, match="no idle layer"):
        pf.to_plugin_form(_mutated(standard, no_selection))
