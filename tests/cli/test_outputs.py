"""Where outputs go (#28): streams are written through, a symlink's target is replaced, other
special files are refused; NaN never passes; a full disk is one line naming the file with
nothing left behind; concurrent `serve repo` writers; leftovers of killed runs are removed.
Each failing case: the exit code, one `error:` line with a hint, no traceback, no file changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from tests.conftest import error_lines

runner = CliRunner()
ROOT = os.geteuid() == 0


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest()
                                               if p.is_file() and not p.is_symlink() else
                                               stat.S_IFMT(p.lstat().st_mode))
            for p in sorted(folder.rglob("*")) if not stat.S_ISFIFO(p.lstat().st_mode)}


def _fails(result, code: int, words: str, *, after_progress: bool = False) -> str:
    """One error line; `after_progress`: a failure mid-run, after the lines of the steps done."""
    lines = error_lines(result.stderr)
    assert result.exit_code == code, result.output
    if after_progress:
        assert [x for x in lines if x.startswith("error")] == lines[-1:], result.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0] and "(hint: " in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture()
def work(tiny_folded_onnx, tmp_path, monkeypatch):
    shutil.copy(tiny_folded_onnx, tmp_path / "idle.onnx")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- special files
@pytest.mark.skipif(not ROOT, reason="mknod needs root")
def test_a_character_device_output_is_written_through_not_replaced(work):
    os.mknod(work / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    result = runner.invoke(app, ["lint", "idle.onnx", "--json", "null"])
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR((work / "null").lstat().st_mode)
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []


def test_a_fifo_gets_the_report_through_it(work):
    os.mkfifo(work / "fifo")
    got = []
    reader = threading.Thread(target=lambda: got.append((work / "fifo").read_bytes()))
    reader.start()
    result = runner.invoke(app, ["lint", "idle.onnx", "--json", "fifo"])
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO((work / "fifo").lstat().st_mode)
    assert json.loads(got[0])["passed"] is True


def test_json_to_dev_stdout_is_the_report_alone_on_stdout(work):
    exe = Path(sys.executable).with_name("idle-export")
    out = work / "captured.txt"
    with open(out, "wb") as f:
        done = subprocess.run([str(exe), "lint", "idle.onnx", "--json", "/dev/stdout"], stdout=f,
                              stderr=subprocess.PIPE, cwd=work, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["path"] == "idle.onnx"  # one JSON document, nothing else


def test_a_symlinked_output_replaces_its_target_and_keeps_the_link(work):
    (work / "real.json").write_text("old")
    (work / "link.json").symlink_to("real.json")
    result = runner.invoke(app, ["lint", "idle.onnx", "--json", "link.json"])
    assert result.exit_code == 0, result.output
    assert (work / "link.json").is_symlink() and os.readlink(work / "link.json") == "real.json"
    assert json.loads((work / "real.json").read_text())["passed"] is True


def test_a_socket_output_is_refused(work):
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(work / "sock"))
        before = _snapshot(work)
        _fails(runner.invoke(app, ["lint", "idle.onnx", "--json", "sock"]), 2, "is a socket")
        assert _snapshot(work) == before
    finally:
        sock.close()


@pytest.mark.parametrize("line, words", [
    ("trt idle.onnx --fp16 --target sm89 -o fifo", "is not a regular file"),
    ("onnx ckpt.pth --external-data -o fifo", "is not a regular file"),
])
def test_outputs_with_files_beside_them_refuse_a_stream(work, tiny_ckpt, line, words):
    shutil.copy(tiny_ckpt, work / "ckpt.pth")
    os.mkfifo(work / "fifo")
    before = _snapshot(work)
    _fails(runner.invoke(app, line.split()), 2, words)
    assert _snapshot(work) == before


# ----------------------------------------------------------------------------- NaN
@pytest.fixture(scope="module")
def nan_model(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with head.bias NaN, and its export (--allow-nonfinite)."""
    import torch

    d = tmp_path_factory.mktemp("nan")
    ck = torch.load(tiny_ckpt, weights_only=False)  # our own seeded file (argparse args)
    ck["model"]["head.bias"][:] = float("nan")
    ck["model"]["blocks.0.mlp.fc1.weight"][0, :2] = float("inf")
    torch.save(ck, d / "nan.pth")
    result = runner.invoke(app, ["onnx", str(d / "nan.pth"), "--allow-nonfinite", "-o", str(d / "nan.onnx")])
    assert result.exit_code == 0, result.output
    return d


def test_onnx_refuses_nonfinite_weights_and_names_them(nan_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _fails(runner.invoke(app, ["onnx", str(nan_model / "nan.pth"), "-o", "x.onnx"]), 2,
                  "non-finite weights")
    assert "head.bias (1,000 NaN of 1,000)" in line and "blocks.0.mlp.fc1.weight (2 inf of" in line
    assert "--allow-nonfinite" in line
    assert list(tmp_path.iterdir()) == []


def test_check_fails_on_nan_and_writes_strict_json(nan_model, tmp_path):
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["check", str(nan_model / "nan.onnx"), "--ckpt", str(nan_model / "nan.pth"),
                                 "--batch", "1", "--json", str(report)])
    assert result.exit_code == 1, result.output
    assert "logits not finite" in result.output

    def no_constants(name):
        raise AssertionError(f"bare {name} in the JSON")

    data = json.loads(report.read_text(), parse_constant=no_constants)
    case = data["cases"][0]
    assert case["max_abs"] is None and not case["passed"]
    assert case["nonfinite_logits"]["candidate"]["nan"] > 0
    assert any(f.startswith("cases[0].max_abs") for f in data["nonfinite_fields"])
    assert any("has non-finite weights" in w and "head.bias" in w for w in data["warnings"])


def test_lint_names_nonfinite_weights(nan_model):
    result = runner.invoke(app, ["lint", str(nan_model / "nan.onnx")])
    assert result.exit_code == 1, result.output
    assert "nonfinite-weights" in result.output and "NaN" in result.output


# ----------------------------------------------------------------------------- full disks
@pytest.fixture()
def small_disk(tmp_path):
    """A 20 MB tmpfs (root only): smaller than the tiny model's ONNX file (23 MB)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
                                  capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("line, words", [
    ("onnx {ckpt} -o {disk}/x.onnx", "needs about"),
    ("trt {onnx} --fp16 --target sm89 -o {disk}/x.engine", "needs about"),
    ("serve repo {onnx} -o {disk}/repo", "needs about"),
    ("lint {onnx} --json {disk}/full/r.json", "no space left on device writing"),
])
def test_a_full_disk_is_one_line_and_leaves_nothing(line, words, small_disk, tiny_ckpt, tiny_folded_onnx):
    if line.startswith("trt") and shutil.which("nvidia-smi") is None:
        pytest.importorskip("tensorrt_rtx")
    (small_disk / "full").mkdir()
    if "/full/" in line:  # fill the disk to the last byte
        with open(small_disk / "full" / "filler", "wb") as f:
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
    before = _snapshot(small_disk)
    args = line.format(ckpt=tiny_ckpt, onnx=tiny_folded_onnx, disk=small_disk).split()
    text = _fails(runner.invoke(app, args), 2, words)
    assert "no space left on device writing" in text and "free" in text
    assert _snapshot(small_disk) == before  # no partial file, no temp file, no empty repo folder


def test_a_disk_that_fills_during_a_build_leaves_no_intermediate(small_disk, tiny_folded_onnx, monkeypatch):
    """The up-front estimate passed (forced here), then the disk filled: the FP16 graph written
    for the parser and any engine are removed again."""
    pytest.importorskip("tensorrt_rtx")
    from idle_export.trt import build

    monkeypatch.setattr(build, "check_free_space", lambda *a, **k: None)
    before = _snapshot(small_disk)
    _fails(runner.invoke(app, ["trt", str(tiny_folded_onnx), "--fp16", "--target", "sm89", "-o",
                               str(small_disk / "x.engine")]), 2, "no space left on device writing",
           after_progress=True)
    assert _snapshot(small_disk) == before


def test_an_export_that_fills_the_disk_leaves_nothing(small_disk, tiny_ckpt, monkeypatch):
    from idle_export.onnx import export

    monkeypatch.setattr(export, "check_free_space", lambda *a, **k: None)
    _fails(runner.invoke(app, ["onnx", str(tiny_ckpt), "-o", str(small_disk / "x.onnx")]), 2,
           f"no space left on device writing {small_disk / 'x.onnx'}")
    assert list(small_disk.iterdir()) == []


# ----------------------------------------------------------------------------- writers at once
def test_two_serve_repo_runs_for_one_new_model(tiny_folded_onnx, tmp_path):
    exe = Path(sys.executable).with_name("idle-export")
    cmd = [str(exe), "serve", "repo", str(tiny_folded_onnx), "-o", str(tmp_path / "repo"), "--name", "m"]
    runs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(r.wait(timeout=180), r.stderr.read()) for r in runs]
    assert sorted(code for code, _ in outs) == [0, 2], outs
    loser = next(err for code, err in outs if code == 2)
    assert "already has version 1" in loser and "Traceback" not in loser
    from idle_export.serve.reader import read_repository

    (model,) = read_repository(tmp_path / "repo")
    assert model.name == "m" and model.version == 1 and model.model_file.stat().st_size > 0
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["m"]


def test_a_held_repository_lock_names_its_holder(tmp_path):
    from idle_export.errors import BadInputError
    from idle_export.fileio import folder_lock

    with folder_lock(tmp_path), pytest.raises(BadInputError, match=f"pid {os.getpid()}"):
        with folder_lock(tmp_path, wait_s=0.3):
            pass


# ----------------------------------------------------------------------------- leftovers
def test_leftovers_of_a_killed_run_are_removed_by_the_next(work):
    dead = subprocess.Popen(["true"])
    dead.wait()
    from idle_export.fileio import TEMP_PREFIX, owner_tag

    stale = work / f"{TEMP_PREFIX}{owner_tag(dead.pid)}-onnx.x1y2"
    stale.mkdir()
    (stale / "raw.onnx").write_bytes(np.zeros(1000, np.uint8).tobytes())
    live = work / f"{TEMP_PREFIX}{owner_tag(1)}-onnx.keep"  # pid 1 started before it: still running
    live.mkdir()
    elsewhere = work / f"{TEMP_PREFIX}{dead.pid}.abcdef-onnx.host"  # another host's: not ours to judge
    elsewhere.mkdir()
    result = runner.invoke(app, ["lint", "idle.onnx", "--json", "r.json"])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists() and elsewhere.exists()
    assert f"removed {stale.name}" in result.stderr and "interrupted run" in result.stderr
