"""The project card's commands as a new user types them, in the folder where `onnx` ran, and the
INT8 loop between `calibrate` and `trt` (issue: the card's commands as typed)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.onnx.metadata import OnnxMetadata

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed "
                               "(pip install tensorrt-rtx-cu13==1.7.1.116)")
runner = CliRunner()
FAST_BENCH = ["--batch", "1", "--runs", "1", "--warmup", "1", "--min-time", "0.02"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    """`idle-export onnx ckpt.pth` run once, as typed, in its folder."""
    folder = tmp_path_factory.mktemp("card")
    shutil.copy(tiny_ckpt, folder / "ckpt.pth")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(folder)
        result = run("onnx", "ckpt.pth")
    assert result.exit_code == 0, result.output
    assert (folder / "ckpt_idle.onnx").is_file()
    return folder


@pytest.fixture()
def card_folder(exported, tmp_path, monkeypatch):
    """A copy of that folder as the current directory."""
    folder = tmp_path / "work"
    shutil.copytree(exported, folder)
    monkeypatch.chdir(folder)
    return folder


@needs_rtx
def test_trt_without_a_file_takes_the_idle_export_here(card_folder):
    result = run("trt", "--fp16", "--target", "sm89", "--profile", "1:2:4")
    assert result.exit_code == 0, result.output
    assert "building from ckpt_idle.onnx" in result.output
    assert "profile images min 1x3x224x224 opt 2x3x224x224 max 4x3x224x224" in result.output
    assert (card_folder / "ckpt_idle.fp16.engine").is_file()


def test_trt_without_a_file_lists_the_candidates_when_there_are_several(card_folder):
    shutil.copy(card_folder / "ckpt_idle.onnx", card_folder / "other_idle.onnx")
    result = run("trt", "--fp16")
    assert result.exit_code == 2, result.output
    assert "2 idle ONNX files" in result.output and "ckpt_idle.onnx, other_idle.onnx" in result.output
    assert "Traceback" not in result.output


def test_trt_without_a_file_in_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("trt", "--fp16")
    assert result.exit_code == 2 and "no idle ONNX file" in result.output
    assert "idle-export onnx CKPT.pth" in result.output


def test_bench_without_files_pairs_idle_with_a_dense_twin_it_exports(card_folder):
    result = run("bench", *FAST_BENCH, "--json", "b.json")
    assert result.exit_code == 0, result.output
    assert "bench: idle ckpt_idle.onnx, dense ckpt_dense.onnx (exported from ckpt.pth)" in result.output
    dense = card_folder / "ckpt_dense.onnx"
    assert dense.is_file() and OnnxMetadata.read(dense).dense
    report = json.loads((card_folder / "b.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"idle-folded", "dense"}
    assert "· exporting the dense twin" in result.output  # a long step is never silent, even piped
    assert "…" not in result.output  # tables are not cut to 80 columns when piped
    # the second time the twin is there already: nothing is exported again; --quiet: no progress
    before = dense.stat().st_mtime_ns
    result = run("--quiet", "bench", *FAST_BENCH)
    assert result.exit_code == 0 and "exported from" not in result.output
    assert "· " not in result.output and "images/s" in result.output
    assert dense.stat().st_mtime_ns == before


@needs_rtx
def test_bench_of_an_engine_without_a_gpu_is_an_error_not_empty_tables(card_folder):
    assert run("trt", "ckpt_idle.onnx", "--fp16", "--target", "sm89", "--profile", "1:2:4").exit_code == 0
    result = run("bench", "ckpt_idle.fp16.engine", "--batch", "64")
    assert result.exit_code == 3, result.output
    assert "needs a GPU" in result.output
    assert "bench the ONNX instead: idle-export bench ckpt_idle.onnx" in result.output


def test_int8_loop_names_files_by_target_and_hints_the_working_command(card_folder):
    ort = card_folder / "ckpt_idle.int8.ort.onnx"
    result = run("calibrate", "ckpt_idle.onnx", "--num", "4")
    assert result.exit_code == 0, result.output
    assert ort.is_file() and OnnxMetadata.read(ort).get("quantization")["target"] == "ort"
    # an ORT-quantized file given to trt: the hint is the command that works, not ORT options
    result = run("trt", ort.name, "--int8", "--target", "sm89")
    assert result.exit_code == 2, result.output
    assert "quantized for ort" in result.output
    assert "idle-export trt ckpt_idle.onnx --int8" in result.output
    assert "idle-export calibrate ckpt_idle.onnx --target trt" in result.output
    # the trt recipe gets its own file; the ort one is not touched
    ort_hash = sha(ort)
    result = run("calibrate", "ckpt_idle.onnx", "--num", "4", "--target", "trt")
    assert result.exit_code == 0, result.output
    assert (card_folder / "ckpt_idle.int8.trt.onnx").is_file() and sha(ort) == ort_hash
    # writing one target's INT8 model over the other's is refused, not silent
    result = run("calibrate", "ckpt_idle.onnx", "--num", "4", "--target", "trt", "-o", ort.name)
    assert result.exit_code == 2 and "calibrated for ort" in result.output
    assert "--output ckpt_idle.int8.trt.onnx" in result.output and sha(ort) == ort_hash
    if HAS_RTX:  # no doubled suffix in the engine's name
        result = run("trt", "ckpt_idle.int8.trt.onnx", "--int8", "--target", "sm89", "--profile", "1:2:4")
        assert result.exit_code == 0, result.output
        assert (card_folder / "ckpt_idle.int8.engine").is_file()
        assert not list(card_folder.glob("*.int8.int8*"))


@needs_rtx
def test_trt_int8_on_an_fp32_export_calibrates_for_tensorrt_itself(card_folder):
    result = run("trt", "ckpt_idle.onnx", "--int8", "--target", "sm89", "--profile", "1:2:4",
                 "--calib-num", "4")
    assert result.exit_code == 0, result.output
    qdq = card_folder / "ckpt_idle.int8.trt.onnx"
    assert "built-in photos" in result.output and qdq.is_file()
    assert OnnxMetadata.read(qdq).get("quantization")["target"] == "trt"
    assert (card_folder / "ckpt_idle.int8.engine").is_file()


def test_calibrate_uses_all_images_of_a_small_folder_unless_num_is_given(card_folder):
    from PIL import Image

    images = card_folder / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (240, 250, 3), dtype=np.uint8)).save(images / f"{i}.png")
    result = run("calibrate", "ckpt_idle.onnx", "--images", images, "-o", "a.onnx")
    assert result.exit_code == 0, result.output
    assert "calibrated on all 3 usable image(s)" in result.output
    assert OnnxMetadata.read(card_folder / "a.onnx").get("quantization")["num_images"] == 3
    result = run("calibrate", "ckpt_idle.onnx", "--images", images, "--num", "5", "-o", "b.onnx")
    assert result.exit_code == 2 and "fewer than --num 5" in result.output
    assert not (card_folder / "b.onnx").exists()
