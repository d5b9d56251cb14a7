import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from idle_export.model.checkpoint import load_checkpoint
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.io import onnx_summary
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.runtime.onnxruntime import OrtRunner


def topk_ks(model) -> list[int]:
    """The constant K of every TopK node, in graph order (an ONNX file or a loaded model)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return [int(np.asarray(consts[n.input[1]]).reshape(-1)[0])
            for n in proto.graph.node if n.op_type == "TopK"]


def test_tiny_idle_graph(tiny_idle_onnx, tiny_ckpt):
    summary = onnx_summary(tiny_idle_onnx)
    ops = summary["ops"]
    assert ops["TopK"] == 9 and ops["ScatterElements"] == 9 and ops["GatherElements"] >= 18
    assert ops["LayerNormalization"] == 25  # one op per LN (opset >= 17)
    assert summary["opset"] >= 17 and not summary["external_data"]
    assert topk_ks(tiny_idle_onnx) == [137, 137, 137, 96, 96, 96, 67, 67, 67]
    onnx.checker.check_model(str(tiny_idle_onnx), full_check=True)
    meta = OnnxMetadata.read(tiny_idle_onnx).props
    assert json.loads(meta["idle_export.keep_k"]) == [137, 137, 137, 96, 96, 96, 67, 67, 67]
    assert json.loads(meta["idle_export.arch"]) == "deit_tiny"
    assert json.loads(meta["idle_export.checkpoint_sha256"]) == load_checkpoint(tiny_ckpt).sha256
    assert meta["idle_export.tool_version"]


def test_dense_graph_has_no_selection(tiny_dense_onnx):
    ops = onnx_summary(tiny_dense_onnx)["ops"]
    assert "TopK" not in ops and "ScatterElements" not in ops
    assert OnnxMetadata.read(tiny_dense_onnx).dense is True


def test_dynamic_batch(tiny_idle_onnx):
    sess = ort.InferenceSession(str(tiny_idle_onnx), providers=["CPUExecutionProvider"])
    for b in (1, 3, 5):
        (out,) = sess.run(["logits"], {"images": np.zeros((b, 3, 224, 224), np.float32)})
        assert out.shape == (b, 1000)


def test_external_data_and_emit_selection(tiny_ckpt, tmp_path):
    ckpt = load_checkpoint(tiny_ckpt)
    out = export_checkpoint(ckpt, ckpt.spec(), tmp_path / "m.onnx", external_data=True,
                            emit_selection=True)
    data = tmp_path / "m.onnx.data"
    assert data.stat().st_size > out.stat().st_size * 10
    assert onnx_summary(out)["external_data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temp files left
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == ["logits"] + [f"selection_layer{i}" for i in range(3, 12)]
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    outs = sess.run(None, {"images": x})
    assert outs[1].shape == (2, 138) and outs[1].dtype == np.int64 and (outs[1][:, 0] == 0).all()
    # The TopK outputs that `check` marks agree with the emitted selection outputs
    with OrtRunner(out, selection=True) as r:
        got = r.infer({"images": x})
    for layer, emitted in zip(range(3, 12), outs[1:]):
        assert (np.sort(got[f"selection_layer{layer}"], 1) == np.sort(emitted[:, 1:] - 1, 1)).all()


def test_deit_small_idle_export(tmp_path_factory):
    """DeiT-Small r=0.7: K per layer 137,137,137,96,96,96,67,67,67 and 9 TopK nodes."""
    from idle_export.demo import write_demo_checkpoint

    folder = tmp_path_factory.mktemp("small")
    ckpt = load_checkpoint(write_demo_checkpoint(folder / "s.pth", "deit_small", 0.7))
    out = export_checkpoint(ckpt, ckpt.spec(), folder / "s.onnx")
    assert onnx_summary(out)["ops"]["TopK"] == 9
    assert topk_ks(out) == [137, 137, 137, 96, 96, 96, 67, 67, 67]


def test_opset_too_old(tiny_ckpt, tmp_path):
    from idle_export.errors import BadInputError

    ckpt = load_checkpoint(tiny_ckpt)
    with pytest.raises(BadInputError, match="opset 16 is too old"):
        export_checkpoint(ckpt, ckpt.spec(), tmp_path / "m.onnx", opset=16)
    assert list(tmp_path.iterdir()) == []
