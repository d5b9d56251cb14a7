"""The OpenVINO IR that `onnx --target openvino` writes beside the file: the token-score path
marked to stay f32 (read back from the IR on any CPU), kept f32 by the CPU plugin when bf16 is
forced (skipped, with the reason, on a CPU without bf16), and `check --precision bf16` on it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.onnx.metadata import OnnxMetadata

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")

from idle_export.runtime.openvino import OpenVinoRunner, openvino_config  # noqa: E402
from idle_export.runtime.openvino_ir import ir_metadata, is_marked  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def ir_export(tiny_ckpt, tmp_path_factory):
    """`idle-export onnx --target openvino` of the seeded deit_tiny: X.onnx + X.xml + X.bin."""
    out = tmp_path_factory.mktemp("ir") / "tiny.onnx"
    result = runner.invoke(app, ["onnx", str(tiny_ckpt), "--target", "openvino", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def _model(path):
    import openvino as ov

    return ov.Core().read_model(str(path))


def test_ir_written_beside_the_onnx_with_the_score_path_marked(ir_export):
    out, log = ir_export
    xml, binary = out.with_suffix(".xml"), out.with_suffix(".bin")
    assert xml.is_file() and binary.is_file()
    assert f"wrote {xml}" in log and "ONNX cannot carry" in log
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".idle-export")]  # no temp left
    model = _model(xml)
    meta = ir_metadata(model)
    assert meta.spec.describe() == OnnxMetadata.read(out).spec.describe()
    assert meta.get("target") == "openvino"
    ops = model.get_ordered_ops()
    marked = [op for op in ops if is_marked(op)]
    by_type = {}
    for op in marked:
        by_type.setdefault(op.get_type_name(), []).append(op)
    layers = len(meta.spec.idle_layers)
    assert len(by_type["TopK"]) == layers == len([op for op in ops if op.get_type_name() == "TopK"])
    assert len(by_type["MVN"]) == layers  # each idle layer's LayerNorm: the scores start from f32 xn
    # folded scores: w = xn[:,0]·(Wqᵀ Wk) + bq Wk, scores = w·xnᵀ: two MatMuls a layer
    assert len(by_type["MatMul"]) == 2 * layers
    # the scores of all N tokens, then the patch tokens' ones: no [B, N-1, C] copy of xn
    n, c = meta.spec.num_patches + 1, meta.spec.embed_dim
    shapes = [op.get_output_partial_shape(0) for op in by_type["Slice"]]
    assert [str(s[1:]) for s in shapes] == [f"[1,{n - 1}]"] * layers, shapes
    assert not [op for op in ops if op.get_type_name() == "Slice"
                and str(op.get_output_partial_shape(0)[1:]) == f"[{n - 1},{c}]"]
    # the big GEMMs are left to the inference precision: most MatMuls are not marked
    assert len([op for op in ops if op.get_type_name() == "MatMul" and not is_marked(op)]) > 3 * layers
    assert json.loads(meta.props["idle_export.openvino_ir"])["fp32_ops"] == len(marked)


def test_no_ir_for_dense_or_when_not_wanted(tiny_ckpt, tmp_path):
    result = runner.invoke(app, ["onnx", str(tiny_ckpt), "--target", "openvino", "--dense",
                                 "-o", str(tmp_path / "d.onnx")])
    assert result.exit_code == 0 and "no OpenVINO IR written (a dense file" in result.output
    result = runner.invoke(app, ["onnx", str(tiny_ckpt), "--target", "openvino", "--no-ir",
                                 "-o", str(tmp_path / "n.onnx")])
    assert result.exit_code == 0 and not (tmp_path / "n.xml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "n.onnx"]


def _runtime_precisions(xml):
    """(layer type, runtime precision) of the compiled ops made of marked ones, and the runtime
    precisions of the other FullyConnected ops, compiled with bf16 forced; skips without bf16."""
    import openvino as ov

    model = _model(xml)
    marked = {op.get_friendly_name() for op in model.get_ordered_ops() if is_marked(op)}
    compiled = ov.Core().compile_model(model, "CPU", openvino_config(1, "bf16"))
    if compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() != "bf16":
        pytest.skip("this CPU has no bf16 (no AVX-512 BF16 or AMX): OpenVINO compiles f32")
    kept, gemms = [], []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = {k: v.astype(str) for k, v in op.get_rt_info().items()}
        names = set(rt["originalLayersNames"].split(","))
        if names & marked and rt["layerType"] not in ("Const", "Input", "Output", "Reorder", "Convert"):
            kept.append((rt["layerType"], rt["runtimePrecision"]))
        elif rt["layerType"] == "FullyConnected":
            gemms.append(rt["runtimePrecision"])
    return kept, gemms


def test_bf16_keeps_the_marked_ops_f32(ir_export):
    """Compiled with bf16 forced, every op made of marked ones runs in f32 (none was re-created
    by a plugin fusion without its marking) and the attention/MLP GEMMs in bf16."""
    kept, gemms = _runtime_precisions(ir_export[0].with_suffix(".xml"))
    assert kept and all(p != "bf16" for _, p in kept), kept
    assert {t for t, _ in kept} >= {"TopK", "MVN", "MatMul", "FullyConnected"}
    assert gemms.count("bf16") > len(gemms) // 2, gemms


def test_bf16_keeps_the_official_score_path_f32(tiny_idle_onnx, tmp_path):
    """--scores official (keys for every token, the head mean as a division): the same."""
    from idle_export.runtime.openvino_ir import write_ir

    xml, _, marked = write_ir(tiny_idle_onnx, tmp_path / "official.xml")
    kept, _ = _runtime_precisions(xml)
    assert marked and kept and all(p != "bf16" for _, p in kept), kept
    divides = [op for op in _model(xml).get_ordered_ops() if op.get_type_name() == "Divide"]
    assert not [op for op in divides if is_marked(op)]  # the head mean went into the query weights


def test_runner_reads_the_ir_and_its_selection(ir_export, tiny_ckpt):
    from idle_export.data.inputs import builtin_photos
    from idle_export.runtime.onnxruntime import OrtRunner

    out = ir_export[0]
    spec = ir_metadata(_model(out.with_suffix(".xml"))).spec
    images = builtin_photos(3, spec)
    with OpenVinoRunner(out.with_suffix(".xml"), selection=True, threads=1) as ov_ir, \
            OrtRunner(out, selection=True) as ref:
        a, b = ov_ir.infer({"images": images}), ref.infer({"images": images})
        assert ov_ir.runtime_precision == "f32" and len(ov_ir.last_scores) == len(spec.idle_layers)
    assert abs(a["logits"] - b["logits"]).max() < 1e-4
    for key in b:
        if key.startswith("selection_layer"):
            assert [set(r) for r in a[key].tolist()] == [set(r) for r in b[key].tolist()]


def test_check_precision_bf16_on_the_ir(ir_export, tiny_ckpt, tmp_path):
    xml = ir_export[0].with_suffix(".xml")
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["check", str(xml), "--ckpt", str(tiny_ckpt), "--backend", "openvino",
                                 "--precision", "bf16", "--inputs", "photos", "--batch", "1,4",
                                 "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["passed"] and data["backend"] == "openvino" and "at OpenVINO bf16" in data["model"]
    assert data["inference_precision"] in ("bf16", "f32")  # f32: a CPU without bf16 (warned)
    assert data["tolerance"]["max_abs"] > 1e-4  # the bf16 tolerance, not fp32's
    assert all("selection" in c for c in data["cases"])


@pytest.mark.parametrize("args,message", [
    (["--precision", "bf16"], "--backend 'ort' has no bf16 inference precision for an FP32 graph (hint: use "
                              "--backend openvino)"),
    (["--backend", "ort"], ".xml file, which --backend 'ort' does not read (hint: use --backend openvino)"),
    (["--backend", "openvino", "--precision", "f16"], "is not one of f32, bf16, default"),
])
def test_check_precision_errors(ir_export, tiny_ckpt, args, message):
    target = ir_export[0].with_suffix(".xml") if "ort" in args else ir_export[0]
    result = runner.invoke(app, ["check", str(target), "--ckpt", str(tiny_ckpt), *args])
    assert result.exit_code == 2 and message in result.output, result.output
