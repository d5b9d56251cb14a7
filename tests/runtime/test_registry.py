"""runtime/registry.py: one record per runtime; every command takes its choices from it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from idle_export import api
from idle_export.cli import app
from idle_export.deps import EXTRAS
from idle_export.onnx.targets import TARGET_PASSES
from idle_export.runtime import registry

PACKAGE = Path(__file__).resolve().parents[2] / "idle_export"


def test_records_are_consistent():
    for name, r in registry.RUNTIMES.items():
        assert r.name == name
        assert r.runs in (registry.ONNX, registry.ENGINE, registry.MODEL)
        assert r.extra is None or r.extra in EXTRAS
        assert r.target is None or r.target in TARGET_PASSES
        assert (r.target is not None) == (r.runs != registry.MODEL)
        assert set(r.precisions) <= {"fp32", "fp16", "bf16", "int8"}
    for role in (registry.ORT_CPU, registry.TORCH, registry.ENGINE_RUNTIME):
        assert role in registry.RUNTIMES


def test_each_runtime_name_is_spelled_once():
    """No module but the registry names a runtime that only the registry knows (the ones that
    are not also an extra, an export target or a Python module) in a string, nor calls a Runner
    class itself."""
    own_names = {n for n in registry.names() if n not in EXTRAS and n not in TARGET_PASSES and "-" in n}
    runner_classes = {"OrtRunner", "OpenVinoRunner", "TrtRunner", "TorchRunner", "OfficialRunner"}
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in own_names, f"{path.name}:{node.lineno} spells {node.value!r}"
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                assert name not in runner_classes, f"{path.name}:{node.lineno} makes a {name} itself"


def test_unknown_and_wrong_kind_are_one_line_exit_2(tiny_idle_onnx, tiny_ckpt):
    check = ["check", str(tiny_idle_onnx), "--ckpt", str(tiny_ckpt), "--backend"]
    res = CliRunner().invoke(app, [*check, "tpu"])
    assert res.exit_code == 2 and "unknown backend 'tpu'" in res.output and "ort-cuda" in res.output
    res = CliRunner().invoke(app, [*check, "trt"])
    assert res.exit_code == 2, res.output
    assert "backend 'trt' runs TensorRT engines, not ONNX files" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("name", [n for n in registry.names(registry.ONNX) if n.startswith("ort-")])
def test_ort_gpu_providers_in_check_and_sweep(name, tiny_idle_onnx, tiny_ckpt, tmp_path):
    """ORT's CUDA and TensorRT providers are runtimes of check and sweep too: where they are
    missing, exit 3 with the reason before any work; where they are there, the check passes."""
    runtime = registry.get(name)
    why = runtime.unavailable()
    args = ["check", str(tiny_idle_onnx), "--ckpt", str(tiny_ckpt), "--backend", name, "--batch", "1,2"]
    res = CliRunner().invoke(app, args)
    if why is None:
        assert res.exit_code == 0, res.output
        return
    assert res.exit_code == 3, res.output
    assert f"the {name} runtime cannot run here" in res.output and "idle-export[gpu]" in res.output
    out = tmp_path / "sweep.json"
    res = CliRunner().invoke(app, ["sweep", str(tiny_ckpt), "--backend", name, "--json", str(out)])
    assert res.exit_code == 3 and not out.exists(), res.output
    pytest.skip(f"{name} checked for its exit 3 only: {why}")


@pytest.fixture
def ort_twin(monkeypatch):
    """A runtime added with one record (a copy of ort under another name)."""
    twin = dataclasses.replace(registry.RUNTIMES["ort"], name="ort-twin", summary="a copy of ort")
    monkeypatch.setitem(registry.RUNTIMES, "ort-twin", twin)
    return twin


def test_a_new_runtime_is_one_record(ort_twin, tiny_idle_onnx, tiny_dense_onnx, tiny_ckpt):
    """One record, and check, bench, open_model and the API's list take it at once."""
    report = api.check(tiny_idle_onnx, ckpt=tiny_ckpt, backend="ort-twin", batch_sizes=(1, 2),
                       inputs=["noise"])
    assert report["passed"] and report["backend"] == "ort-twin" and report["a"].startswith("ort-twin:")
    report = api.bench([tiny_idle_onnx, tiny_dense_onnx], backends=["ort-twin"], batches=[1], runs=1,
                       warmup=1, min_time=0.01, threads=1)
    assert {r["backend"] for r in report["results"]} == {"ort-twin"}
    assert "cpu_ms_per_image" in report["results"][0]  # cpu=True came from the record
    with api.open_model(tiny_idle_onnx, backend="ort-twin") as m:
        assert m.name.startswith("ort-twin:")
    assert "ort-twin" in [r["name"] for r in api.runtimes()]


def test_api_runtimes_say_why_not_here():
    listed = {r["name"]: r for r in api.runtimes()}
    assert listed["ort"]["unavailable"] is None and listed["ort"]["runs"] == "onnx"
    for r in listed.values():
        assert r["unavailable"] is None or isinstance(r["unavailable"], str)


@pytest.mark.parametrize("default", ["bf16", "f32"])
def test_onnx_names_the_faster_target_here(default, tiny_ckpt, tmp_path, monkeypatch):
    """`onnx` (portable) says which target to use when a CPU runtime computes faster than FP32
    here by default (OpenVINO's bf16 on AMX / AVX-512 BF16); forced both ways, so the test does
    not depend on the CPU."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    forced = dataclasses.replace(registry.RUNTIMES["openvino"], default_precision=lambda: default)
    monkeypatch.setitem(registry.RUNTIMES, "openvino", forced)
    res = CliRunner().invoke(app, ["onnx", str(tiny_ckpt), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    said = "openvino computes in bf16 by default on this CPU" in res.output
    assert said == (default == "bf16") and ("--target openvino" in res.output) == said
