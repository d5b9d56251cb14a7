"""`idle-export onnx --target`: each target's passes are in the file (ops present/absent,
metadata), the file keeps parity with torch (`check`), bench and OrtRunner do not re-apply passes
a file already has, and a plugin-form export takes no CPU target."""

from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.targets import TARGET_PASSES, file_passes, file_target, runs_on

runner = CliRunner()


@pytest.fixture(scope="module")
def target_files(tiny_ckpt, tiny_folded_onnx, tmp_path_factory):
    """The tiny model for each non-portable CPU target: `onnx --target ort` with the CLI; the
    openvino file by apply_target on the portable export (what export_onnx does before writing)."""
    from idle_export.onnx.targets import apply_target

    d = tmp_path_factory.mktemp("targets")
    out = d / "tiny_idle.ort.onnx"
    res = runner.invoke(app, ["onnx", str(tiny_ckpt), "-o", str(out), "--target", "ort",
                              "--json", str(d / "ort.json")])
    assert res.exit_code == 0, res.output
    assert "target ort (fold_initializer_ops, gather_rows, bias_gelu)" in res.output
    assert json.loads((d / "ort.json").read_text())["passes"] == list(TARGET_PASSES["ort"])
    ov = d / "tiny_idle.openvino.onnx"
    onnx.save(apply_target(onnx.load(str(tiny_folded_onnx)), "openvino"), str(ov))
    return {"ort": out, "openvino": ov}


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_each_target_writes_its_passes(target_files, tiny_folded_onnx):
    portable = _ops(tiny_folded_onnx)
    meta = OnnxMetadata.read(tiny_folded_onnx)
    assert file_target(meta) == "portable" and file_passes(meta) == []
    assert portable["GatherElements"] and portable["Erf"] and not portable["GatherND"]
    for target, path in target_files.items():
        ops, meta = _ops(path), OnnxMetadata.read(path)
        assert file_target(meta) == target and file_passes(meta) == list(TARGET_PASSES[target])
        assert meta.has_spec and meta.score_mode == "folded"  # the export's metadata is kept
        assert not ops["GatherElements"] and not ops["ScatterElements"]  # gather_rows: row copies
        assert ops["GatherND"] and ops["ScatterND"] == ops["TopK"] == 9
        if target == "ort":  # ONNX Runtime's fused op, ORT-only
            assert ops["BiasGelu"] == 12 and not ops["Erf"]
            assert not runs_on(meta, "openvino") and runs_on(meta, "ort")
        else:  # standard ops only
            proto = onnx.load(str(path), load_external_data=False)
            assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and ops["Erf"] == 12
            assert runs_on(meta, "openvino") and runs_on(meta, "ort")


@pytest.mark.parametrize("target,backend", [("ort", "ort"), ("openvino", "openvino")])
def test_target_files_pass_check_against_torch(target_files, tiny_ckpt, tmp_path, target, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (idle-export[openvino])")
    out = tmp_path / "check.json"
    res = runner.invoke(app, ["check", str(target_files[target]), "--ckpt", str(tiny_ckpt), "--batch", "1,5",
                              "--backend", backend, "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["backend"] == backend and report["passed"]
    assert all(c["max_abs"] <= 1e-4 and c["selection"] == 1.0 and c["top1"] == 1.0 for c in report["cases"])


def test_tuned_files_are_not_optimised_again(target_files, tiny_folded_onnx):
    from idle_export.runtime.onnxruntime import OrtRunner
    from idle_export.runtime.openvino import OpenVinoRunner

    with OrtRunner(target_files["ort"], optimize=True) as r:
        assert r.passes_at_load == [] and r.file_passes == list(TARGET_PASSES["ort"])
    with OrtRunner(tiny_folded_onnx, optimize=True) as r:  # a portable file: passes in memory
        assert r.passes_at_load == list(TARGET_PASSES["ort"]) and r.file_passes == []
    pytest.importorskip("openvino")
    with OpenVinoRunner(target_files["openvino"], optimize=True) as r:
        assert r.passes_at_load == []
    with OpenVinoRunner(tiny_folded_onnx, optimize=True) as r:
        assert r.passes_at_load == list(TARGET_PASSES["openvino"])


def test_target_errors(tiny_ckpt, tmp_path):
    res = runner.invoke(app, ["onnx", str(tiny_ckpt), "-o", str(tmp_path / "x.onnx"), "--target", "cuda"])
    assert res.exit_code == 2 and "--target 'cuda'" in res.output and "portable" in res.output
    res = runner.invoke(app, ["onnx", str(tiny_ckpt), "-o", str(tmp_path / "x.onnx"), "--plugin",
                              "--target", "ort"])
    assert res.exit_code == 2 and "--plugin" in res.output and not (tmp_path / "x.onnx").exists()
