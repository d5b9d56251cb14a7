"""`idle-export sweep` through the real CLI on the trained photos10 model: one row per ratio, K from
the schedule rule, all from one elastic file (no export per ratio), GMACs rising with the ratio,
ratio 1.0 equal to the dense model (checked on the exported files with ONNX Runtime here), the
picked file, exit 1 when nothing qualifies, and bad input. Speed figures are never asserted (they
belong in benchmark JSON), only their shape."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.explore.conftest import error_line, run_cli

runner = CliRunner()
FAST = ["--batch", "1", "--runs", "1", "--warmup", "1", "--min-time", "0.01"]


@pytest.fixture(scope="module")
def swept(photos10_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    (d / "onnx").mkdir()
    result = run_cli("sweep", photos10_ckpt, "--ratios", "0.6,1", "--num", "20", *FAST,
                     "--json", d / "sweep.json", "--plot", d / "pareto.png", "--onnx-dir", d / "onnx",
                     "--min-agreement", "1.0", "-o", d / "picked.onnx")
    assert result.exit_code == 0, result.output
    return d, json.loads((d / "sweep.json").read_text()), result


def test_one_row_per_ratio_with_the_schedules_k(swept, photos10_ckpt):
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.onnx.metadata import OnnxMetadata

    d, report, _ = swept
    rows = report["results"]
    assert [r["keep_rate"] for r in rows] == [0.6, 1.0]
    ckpt = load_checkpoint(photos10_ckpt)
    for r in rows:
        spec = ckpt.spec(keep_rate=r["keep_rate"])  # the checkpoint's schedule, K from the ratio
        assert r["k_per_layer"] == {str(layer): k for layer, k in spec.k_by_layer.items()}
        meta = OnnxMetadata.read(d / "onnx" / r["file"])  # the one elastic file, run at the ratio
        assert meta.elastic is not None and meta.spec.at_rate(r["keep_rate"]).keep_k == spec.keep_k
        assert list(r["images_per_s"]) == ["1"] and r["images_per_s"]["1"] > 0
        assert r["latency_ms"]["1"] > 0
        assert 0.0 <= r["agreement"] <= 1.0 and r["accuracy"] is not None  # photos10's classes
    assert rows[0]["k_per_layer"]["3"] == int(196 * 0.6) and rows[1]["k_per_layer"]["11"] == 196
    assert rows[0]["gmacs"] < rows[1]["gmacs"]
    assert rows[1]["agreement"] == 1.0
    assert report["dense"]["gmacs"] > rows[0]["gmacs"] and list(report["dense"]["images_per_s"]) == ["1"]
    assert report["images"]["num"] == 20 and report["backend"] == "ort"
    assert {r["file"] for r in rows} == {report["settings"]["elastic"]}
    assert sorted(p.name for p in (d / "onnx").iterdir()) == sorted([report["settings"]["elastic"],
                                                                    report["dense"]["file"]])


def test_ratio_one_reproduces_the_dense_model(swept):
    import onnxruntime as ort

    from idle_export.data.inputs import builtin_photos
    from idle_export.onnx.metadata import OnnxMetadata

    d, report, _ = swept
    full = d / "onnx" / report["results"][1]["file"]
    dense = d / "onnx" / report["dense"]["file"]
    assert OnnxMetadata.read(dense).dense and not OnnxMetadata.read(full).dense
    x = builtin_photos(16, OnnxMetadata.read(full).spec, seed=3)
    a = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"]).run(
        None, {"images": x, "keep_rate": np.asarray(1.0, np.float32)})[0]
    b = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert np.abs(a - b).max() <= 1e-5


def test_picked_file_plot_and_table(swept):
    d, report, result = swept
    choice = report["choice"]
    assert choice["met"] and choice["keep_rate"] in (0.6, 1.0)
    picked = next(r for r in report["results"] if r["keep_rate"] == choice["keep_rate"])
    assert picked["agreement"] == 1.0  # --min-agreement 1.0
    from idle_export.data.inputs import builtin_photos
    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.runtime.onnxruntime import OrtRunner

    meta = OnnxMetadata.read(d / "picked.onnx")  # the fixed-K export of the pick, as before
    assert meta.elastic is None and meta.spec.keep_rate == choice["keep_rate"]
    x = builtin_photos(4, meta.spec, seed=1)
    with OrtRunner(d / "picked.onnx") as fixed, OrtRunner(d / "onnx" / picked["file"],
                                                          keep_rate=choice["keep_rate"]) as elastic:
        diff = fixed.infer({"images": x})["logits"] - elastic.infer({"images": x})["logits"]
        assert np.abs(diff).max() <= 1e-6
    assert f"picked: keep ratio {choice['keep_rate']:g} meets agreement ≥ 100.0%" in result.stderr
    png = Image.open(d / "pareto.png")
    assert png.format == "PNG" and png.size[0] > 300
    assert "dense" in result.stdout and "0.6" in result.stdout


def test_no_ratio_meets_the_budget_exit_1_names_the_closest(swept, photos10_ckpt, tmp_path):
    """ImageFolder with the checkpoint's class names: accuracy; an impossible budget: exit 1.
    The first sweep's --onnx-dir is reused: its exports are not made again."""
    from skimage import data

    folder = tmp_path / "val"
    for name in ("chelsea", "coffee"):
        (folder / name).mkdir(parents=True)
        Image.fromarray(getattr(data, name)()).save(folder / name / "0.png")
    out = tmp_path / "picked.onnx"
    onnx_dir = swept[0] / "onnx"
    before = {p.name: p.stat().st_mtime_ns for p in onnx_dir.iterdir()}
    result = run_cli("sweep", photos10_ckpt, "--images", folder, "--ratios", "1", *FAST,
                     "--latency-ms", "0.001", "-o", out, "--json", tmp_path / "r.json",
                     "--onnx-dir", onnx_dir)
    assert result.exit_code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]  # after the progress and per-ratio lines
    assert "Traceback" not in result.output and "(hint: " in line
    assert line.startswith("error: no keep ratio meets ≤ 0.001 ms per call at batch 1; the closest is 1 (")
    assert "agreement 100.0%" in line and "ms per call at batch 1" in line
    assert not out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["choice"]["met"] is False and report["results"][0]["accuracy"] is not None
    assert report["images"]["num"] == 2 and report["images"]["labels"]
    assert {p.name: p.stat().st_mtime_ns for p in onnx_dir.iterdir()} == before  # reused, not rewritten


def _bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"\x89PNG not really")
    (junk / "b.jpg").write_text("text")
    wrong = tmp_path / "wrong"
    for name, seed in (("chelsea", 0), ("dog", 1)):
        (wrong / name).mkdir(parents=True)
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(wrong / name / "0.png")


BAD = {
    "ratio 0": (["--ratios", "0,0.5"], "keep ratio 0 is outside (0, 1]"),
    "ratio > 1": (["--ratios", "0.5:1.2:0.1"], "keep ratio 1.1 is outside (0, 1]"),
    "ratio text": (["--ratios", "half"], "is not start:stop:step"),
    "empty folder": (["--images", "{t}/empty"], "is empty"),
    "unreadable folder": (["--images", "{t}/junk"], "none of its 2 files is a readable image"),
    "class folder": (["--images", "{t}/wrong"], "class folder {t}/wrong/dog is not one of the checkpoint's"),
    "latency, two batches": (["--latency-ms", "5", "--batch", "1,64"], "--latency-ms needs one batch size"),
    "-o without a rule": (["-o", "{t}/x.onnx"], "nothing says how to pick"),
    "agreement > 1": (["--min-agreement", "99"], "is outside [0, 1]"),
    "unknown backend": (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_output(case, photos10_ckpt, tmp_path):
    work = tmp_path / "work"  # (the image cache lives in tmp_path / "cache")
    work.mkdir()
    _bad_folders(work)
    before = sorted(work.rglob("*"))
    args, message = BAD[case]
    result = run_cli("sweep", photos10_ckpt, *[a.format(t=work) for a in args],
                     "--json", work / "r.json", "--plot", work / "p.png")
    assert result.exit_code == 2, result.output
    assert message.format(t=work) in error_line(result)
    assert sorted(work.rglob("*")) == before  # no report, no plot, no ONNX


def test_openvino_missing_is_exit_3(photos10_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    result = run_cli("sweep", photos10_ckpt, "--backend", "openvino", "--json", tmp_path / "r.json")
    assert result.exit_code == 3, result.output
    assert "needs OpenVINO" in error_line(result) and "pip install openvino" in result.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_lvvit_sweep_ratio_one_is_dense(lvvit_ckpt, tmp_path):
    import onnxruntime as ort

    from idle_export.data.inputs import builtin_photos
    from idle_export.onnx.metadata import OnnxMetadata

    (tmp_path / "onnx").mkdir()
    result = run_cli("sweep", lvvit_ckpt, "--ratios", "0.5,1", "--num", "10", *FAST, "--onnx-dir",
                     tmp_path / "onnx", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["results"]
    assert [r["keep_rate"] for r in rows] == [0.5, 1.0] and rows[0]["gmacs"] < rows[1]["gmacs"]
    assert rows[0]["k_per_layer"]["4"] == 98 and rows[1]["agreement"] == 1.0
    full, dense = tmp_path / "onnx" / rows[1]["file"], tmp_path / "onnx" / report["dense"]["file"]
    assert OnnxMetadata.read(full).elastic["exponents"] == [1] * 4 + [2] * 4 + [3] * 4  # LV-ViT's own
    x = builtin_photos(8, OnnxMetadata.read(full).spec)
    a = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"]).run(
        None, {"images": x, "keep_rate": np.asarray(1.0, np.float32)})[0]
    b = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert np.abs(a - b).max() <= 1e-5
