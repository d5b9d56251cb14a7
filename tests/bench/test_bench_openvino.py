"""OpenVINO as a bench backend and as an INT8 target (NNCF): report structure (never speed),
the selection path kept FP32 in the compiled INT8 model, and exit 3 when OpenVINO or NNCF are
missing."""

from __future__ import annotations

import json
import sys

import onnx
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.onnx.metadata import OnnxMetadata
from tests.conftest import error_lines

runner = CliRunner()
FAST = dict(runs=2, warmup=1, min_time=0.02)


def _compiled_precisions(compiled, names: set) -> tuple[dict, int]:
    """The runtime precision of each op of the compiled model made from an ONNX node in `names`,
    and how many FullyConnected ops run in INT8."""
    precisions, int8_layers = {}, 0
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        prec = info["runtimePrecision"].astype(str)
        for name in set(info["originalLayersNames"].astype(str).split(",")) & names:
            precisions[name] = prec
        int8_layers += info["layerType"].astype(str) == "FullyConnected" and prec in ("i8", "u8")
    return precisions, int8_layers


@pytest.fixture(scope="module")
def ov_int8(tiny_folded_onnx, tmp_path_factory):
    pytest.importorskip("nncf", reason="NNCF is not installed (pip install 'idle-export[openvino]')")
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    from idle_export.quantize.qdq import quantize_onnx

    out = tmp_path_factory.mktemp("ov_int8") / "tiny.int8.openvino.onnx"
    report = quantize_onnx(tiny_folded_onnx, out, num=8, target="openvino", cache_dir=False)
    return out, report


def test_openvino_int8_keeps_the_selection_path_fp32(ov_int8):
    """In the NNCF file no DequantizeLinear feeds a score MatMul, and OpenVINO's compiled model
    runs those MatMuls in f32 while the linear layers run in INT8."""
    import openvino as ov

    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.onnx.targets import file_passes, file_target
    from idle_export.quantize.selection import dequantized_score_inputs, score_matmuls

    path, report = ov_int8
    assert report["score_matmuls_fp32"] == report["topk"] == 9 and report["target"] == "openvino"
    proto = onnx.load(str(path))
    assert dequantized_score_inputs(proto) == [False] * 9
    meta = OnnxMetadata.of(proto)
    assert meta.precision == "int8" and meta.get("quantization")["tool"].startswith("nncf")
    assert file_target(meta) == "openvino" and "gather_rows" in file_passes(meta)
    scores = {m.name for m in score_matmuls(proto)}
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    precisions, int8_layers = _compiled_precisions(compiled, scores)
    assert precisions == dict.fromkeys(scores, "f32")
    assert int8_layers >= 12 * 4 - 9  # the qkv/proj/fc1/fc2 linears of 12 blocks, minus ignored


def test_bench_openvino_and_ort_side_by_side(tiny_folded_onnx, tiny_dense_onnx, ov_int8):
    from idle_export.bench.run import run_bench

    files = [tiny_folded_onnx, tiny_dense_onnx, ov_int8[0]]
    report = run_bench(files, backends=["ort", "openvino"], batches=[1, 2], threads=1, **FAST)
    from idle_export.runtime.openvino import openvino_default_precision

    keys = {(r["backend"], r["variant"]) for r in report["results"]}
    default = openvino_default_precision()  # bf16 on AMX: OpenVINO's own dense is timed too
    assert keys == {("ort", "idle-folded"), ("ort", "dense"), ("openvino", "idle-folded"),
                    ("openvino", "dense"), ("openvino", "idle-folded-int8")} | (
                        {("openvino", f"dense@{default}")} if default != "f32" else set())
    for r in report["results"]:  # timed as written: the files' own passes, none added
        assert r["passes_at_load"] == [] and "cpu_ms_per_image" in r
        assert r["precision"] == ("int8" if r["variant"].endswith("int8") else
                                  default if r["variant"].startswith("dense@") else "fp32")
    assert any("not timed on ort" in s and "int8" in s for s in report["skipped"])
    assert any("without the openvino target's passes" in n for n in report["notes"])
    comps = {(c["backend"], c["variant"], c["batch"]): c for c in report["comparisons"]}
    assert comps[("openvino", "idle-folded-int8", 2)]["baseline"] == "openvino:dense"
    cross = report["vs_openvino_dense"]
    idle = ("ort:idle-folded", "openvino:idle-folded", "openvino:idle-folded-int8")
    assert {(c["variant"], c["batch"]) for c in cross} == {(v, b) for v in idle for b in (1, 2)}
    for bs in (1, 2):
        for precision in ("fp32", "int8"):
            rows = [c for c in cross if c["batch"] == bs and c["precision"] == precision]
            assert sum(c["best"] for c in rows) == 1
            assert all(c["baseline"] == "openvino:dense" and c["cpu_speedup"] > 0 for c in rows)
    json.dumps(report)


def test_bench_checkpoint_exports_each_backends_target(tiny_ckpt, tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "b.json"
    res = runner.invoke(app, ["bench", str(tiny_ckpt), "--backend", "openvino", "--batch", "1",
                              "--scores", "folded", "--runs", "1", "--warmup", "1", "--min-time", "0.01",
                              "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    from idle_export.runtime.openvino import openvino_default_precision

    default = openvino_default_precision()  # bf16 on AMX / AVX-512 BF16: its dense is timed there too
    peer = [(f"dense@{default}", "openvino")] if default != "f32" else []
    assert [(r["variant"], r["target"]) for r in report["results"]] == [("idle-folded", "openvino"),
                                                                       ("dense", "openvino"), *peer]
    assert all(r["passes_in_file"] == ["fold_initializer_ops", "gather_rows"] for r in report["results"])
    assert report["notes"] == [] and "timed as written" in res.output


@pytest.mark.parametrize("missing", ["openvino", "nncf"])
def test_missing_openvino_or_nncf_exit_3(tiny_folded_onnx, tiny_dense_onnx, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import openvino` / `import nncf` fails
    calls = [["calibrate", str(tiny_folded_onnx), "--target", "openvino", "-o", str(tmp_path / "q.onnx")]]
    if missing == "openvino":
        calls += [["bench", str(tiny_folded_onnx), str(tiny_dense_onnx), "--backend", "openvino"],
                  ["check", str(tiny_folded_onnx), "--against", str(tiny_folded_onnx),
                   "--backend", "openvino"]]
    for args in calls:
        if args[0] == "calibrate" and missing == "openvino":
            monkeypatch.setitem(sys.modules, "nncf", None)  # NNCF without OpenVINO fails to import
        res = runner.invoke(app, args)
        lines = error_lines(res.output)
        assert res.exit_code == 3, (args, res.output)
        assert len(lines) == 1 and 'pip install "idle-export[openvino]"' in lines[0], lines
    assert not (tmp_path / "q.onnx").exists()


def test_dense_at_openvinos_default_precision_and_the_fastest_dense(tiny_folded_onnx, tiny_dense_onnx,
                                                                   monkeypatch):
    """Where OpenVINO computes in bf16 by default (AMX), bench also times OpenVINO's dense at that
    default (compiled without the f32 hint) and reports the fastest exact idle against the fastest
    dense of any runtime and precision. Forced here, so the test does not depend on the CPU."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    import dataclasses

    from idle_export.bench.run import run_bench
    from idle_export.hardware import MATRIX_FLAGS
    from idle_export.runtime import registry

    forced = dataclasses.replace(registry.RUNTIMES["openvino"], default_precision=lambda: "bf16")
    monkeypatch.setitem(registry.RUNTIMES, "openvino", forced)
    report = run_bench([tiny_folded_onnx, tiny_dense_onnx], backends=["ort", "openvino"], batches=[1],
                       threads=1, **FAST)
    by_key = {(r["backend"], r["variant"]): r for r in report["results"]}
    assert by_key[("openvino", "dense@bf16")]["precision"] == "bf16"
    (row,) = report["vs_fastest_dense"]
    dense = [r for r in report["results"] if r["variant"].startswith("dense")]
    fastest = max(dense, key=lambda r: r["images_per_s"])
    assert row["dense"] == f"{fastest['backend']}:{fastest['variant']}"
    idle = max((r for r in report["results"] if r["variant"].startswith("idle")),
               key=lambda r: r["images_per_s"])
    assert row["speedup"] == pytest.approx(idle["images_per_s"] / fastest["images_per_s"])
    assert set(report["environment"]["cpu_matrix_features"]) <= set(MATRIX_FLAGS)
    assert report["environment"]["onnxruntime_session_config"] == {"session.x64quantprecision": "1"}


def _forced_bf16(monkeypatch):
    """OpenVINO's default precision forced to bf16, so the test does not depend on the CPU (where
    the CPU has no bf16, OpenVINO computes such a model in f32)."""
    import dataclasses

    from idle_export.runtime import registry

    forced = dataclasses.replace(registry.RUNTIMES["openvino"], default_precision=lambda: "bf16")
    monkeypatch.setitem(registry.RUNTIMES, "openvino", forced)


def test_the_marked_ir_beside_an_idle_file_is_timed_at_the_default_precision(tiny_folded_onnx,
                                                                              tiny_dense_onnx, tmp_path,
                                                                              monkeypatch):
    """`onnx --target openvino` writes X.xml beside X.onnx; bench times it at OpenVINO's default
    (what a user's compile_model of X.xml runs) and counts it as an exact idle (its scores are
    f32) for the headline against the fastest dense. An IR older than its ONNX is not used."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    import os
    import shutil

    from idle_export.bench.run import run_bench
    from idle_export.runtime.openvino_ir import write_ir

    _forced_bf16(monkeypatch)
    idle = tmp_path / "tiny_folded.onnx"
    shutil.copy(tiny_folded_onnx, idle)
    xml, _, marked = write_ir(idle)
    assert marked > 0
    report = run_bench([idle, tiny_dense_onnx], backends=["openvino"], batches=[1], threads=1, **FAST)
    by_key = {(r["backend"], r["variant"]): r for r in report["results"]}
    ir = by_key[("openvino", "idle-folded@bf16")]
    assert ir["file"] == str(xml) and ir["precision"] == "bf16"
    variants = ("idle-folded", "idle-folded@bf16", "dense", "dense@bf16")
    assert set(by_key) == {("openvino", v) for v in variants}
    (row,) = report["vs_fastest_dense"]
    idle_rows = [r for r in report["results"] if r["variant"].startswith("idle")]
    assert row["idle"] == "openvino:" + max(idle_rows, key=lambda r: r["images_per_s"])["variant"]
    os.utime(idle, (xml.stat().st_mtime + 10,) * 2)  # the ONNX written again after its IR
    report = run_bench([idle, tiny_dense_onnx], backends=["openvino"], batches=[1], threads=1, **FAST)
    assert "idle-folded@bf16" not in {r["variant"] for r in report["results"]}


def test_calibrate_for_openvino_writes_the_marked_int8_ir(tiny_folded_onnx, tmp_path):
    """api.quantize(target="openvino") writes the Q/DQ file and its IR: the linear layers run in
    INT8, the attention MatMuls are left unquantized (their Q/DQ cost more than they save in
    OpenVINO), and compiled at bf16 the token scores stay f32."""
    pytest.importorskip("nncf", reason="NNCF is not installed (pip install 'idle-export[openvino]')")
    import openvino as ov

    from idle_export import api
    from idle_export.quantize.selection import activation_matmuls, score_matmuls

    out = tmp_path / "tiny.int8.openvino.onnx"
    report = api.quantize(tiny_folded_onnx, out, num=8, target="openvino", cache=False)
    xml, binary = (tmp_path / "tiny.int8.openvino.xml", tmp_path / "tiny.int8.openvino.bin")
    assert report["openvino_ir"] == [str(xml), str(binary)] and binary.is_file()
    proto = onnx.load(str(out))
    made_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    from idle_export.onnx.targets import apply_target

    attention = activation_matmuls(apply_target(onnx.load(str(tiny_folded_onnx)), "openvino"))
    assert len(attention) >= 2 * 12 and {n.name for n in proto.graph.node} >= set(attention)
    assert report["attention_unquantized"] == len(attention) and report["selection_path_fp32"] > 0
    assert all(made_by.get(i) != "DequantizeLinear" for n in proto.graph.node if n.name in attention
               for i in n.input)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]  # the patch embedding: bf16 in OpenVINO
    assert report["conv_unquantized"] == len(convs) == 1
    # symmetric activations (NNCF's PERFORMANCE preset): every zero point of every quantizer is 0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(zero_points) >= 12 * 4
    assert not any(z.any() for z in zero_points)
    assert all(made_by.get(i) != "DequantizeLinear" for i in convs[0].input)
    # SmoothQuant's scalings after a LayerNorm feeding nothing else went into the LayerNorm: each
    # LN2 and the dense layers' LN1; an idle layer's LN1 also feeds the scores and keeps its Mul
    idle = len(OnnxMetadata.read(out).spec.idle_layers)
    assert report["smoothquant_scales_in_layernorm"] == 2 * 12 - idle
    assert not [n for n in proto.graph.node
                if n.op_type == "Mul" and made_by.get(n.input[0]) == "LayerNormalization"]
    scores = {m.name for m in score_matmuls(proto)}
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    precisions, int8_layers = _compiled_precisions(compiled, scores)
    assert precisions == dict.fromkeys(scores, "f32")
    assert int8_layers >= 12 * 4  # qkv, proj, fc1, fc2 of every block
    # NNCF's own transformer default, MIXED (asymmetric activations), on request
    mixed = tmp_path / "mixed.int8.openvino.onnx"
    report = api.quantize(tiny_folded_onnx, mixed, num=4, target="openvino", cache=False,
                          activations="asymmetric")
    assert report["activations"] == "asymmetric" and report["preset"] == "mixed"
    proto = onnx.load(str(mixed))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert any(inits[n.input[2]].any() for n in proto.graph.node if n.op_type == "QuantizeLinear")
    no_ir = api.quantize(tiny_folded_onnx, tmp_path / "q.int8.ort.onnx", num=8, target="ort", cache=False)
    assert no_ir["openvino_ir"] is None and not (tmp_path / "q.int8.ort.xml").exists()
