"""The CLI as a user meets it: one-line errors with exit codes, no partial files, fast --help."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from idle_export.cli import app
from tests.conftest import error_lines, save_code_running_pickle

runner = CliRunner()
EXE = Path(sys.executable).with_name("idle-export")


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_is_instant_and_imports_no_heavy_library():
    code = ("import sys, idle_export.cli as c; from typer.main import get_command; "
            "get_command(c.app).get_help; heavy = {'torch', 'onnxruntime', 'onnx', 'tensorrt_rtx', "
            "'tensorrt', 'timm', 'matplotlib'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    proc = subprocess.run([str(EXE), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "onnx" in proc.stdout and "check" in proc.stdout
    assert subprocess.run([str(EXE), "--version"], capture_output=True, text=True).stdout.startswith(
        "idle-export ")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.pth").write_text("not a checkpoint")
    data = tiny_ckpt.read_bytes()
    (d / "cut.pth").write_bytes(data[: len(data) // 3])

    save_code_running_pickle(d / "evil.pth")
    return d


CASES = {
    "missing file": (["onnx", "{d}/nope.pth"], "checkpoint not found"),
    "not a checkpoint": (["onnx", "{d}/notes.pth"], "is not a PyTorch checkpoint"),
    "truncated": (["onnx", "{d}/cut.pth"], "truncated or corrupt"),
    "code in pickle": (["onnx", "{d}/evil.pth"], "will not unpickle"),
    "wrong arch": (["onnx", "{ckpt}", "--arch", "deit_small"], "weights do not fit deit_small"),
    "keep 0": (["onnx", "{ckpt}", "--keep", "0"], "keep rate 0.0 is outside (0, 1]"),
    "keep > 1": (["onnx", "{ckpt}", "--keep", "1.5"], "keep rate 1.5 is outside (0, 1]"),
    "keep NaN": (["onnx", "{ckpt}", "--keep", "nan"], "keep rate nan is outside (0, 1]"),
    "idle layer out of range": (["onnx", "{ckpt}", "--idle-layers", "3,12"], "idle layer 12 is out of range"),
    "not writable": (["onnx", "{ckpt}", "-o", "/sys/m.onnx"], "is not writable"),
    "no such folder": (["onnx", "{ckpt}", "-o", "{d}/no/such/m.onnx"], "does not exist"),
    "bad K list": (["onnx", "{ckpt}", "--keep-k", "10,x"], "not a comma-separated list"),
    "check no reference": (["check", "{onnx}"], "needs exactly one reference"),
    "check not onnx": (["check", "{d}/notes.pth", "--ckpt", "{ckpt}"], "is not an ONNX model"),
    # a --json report that cannot be written fails before the work, not after it
    "check --json not writable": (["check", "{onnx}", "--ckpt", "{ckpt}", "--json", "/sys/r.json"],
                                  "not writable (hint: choose another --json"),
    "bench --json not writable": (["bench", "{onnx}", "--json", "/sys/r.json"],
                                  "not writable (hint: choose another --json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_2_no_output(case, bad_files, tiny_ckpt, tiny_idle_onnx):
    args, message = CASES[case]
    args = [a.format(d=bad_files, ckpt=tiny_ckpt, onnx=tiny_idle_onnx) for a in args]
    before = set(bad_files.iterdir()) | set(tiny_ckpt.parent.iterdir())
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)  # progress lines of slow steps aside
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "(hint: " in lines[0] and "Traceback" not in result.output
    assert set(bad_files.iterdir()) | set(tiny_ckpt.parent.iterdir()) == before  # nothing written
    assert not (bad_files / "pwned").exists()


def test_real_process_has_no_traceback(bad_files):
    proc = subprocess.run([str(EXE), "onnx", str(bad_files / "cut.pth")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr


def test_export_and_check_commands(tiny_ckpt, tmp_path):
    out = tmp_path / "t.onnx"
    result = run_cli("onnx", tiny_ckpt, "-o", out, "--schedule", "train", "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "8 TopK" in result.stderr and out.exists()
    result = run_cli("check", out, "--ckpt", tiny_ckpt, "--batch", "1,3", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.stdout
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and len(report["cases"]) == 4
    assert sorted(report["cases"][0]["selection_per_layer"]) == sorted(str(i) for i in range(4, 12))


def test_check_exit_1_on_mismatch(tiny_ckpt, tiny_idle_onnx, tmp_path):
    """A checkpoint with other weights than the export: parity fails, exit 1, warning shown."""
    from idle_export.model.checkpoint import load_checkpoint

    other = {k: v * 1.01 for k, v in load_checkpoint(tiny_ckpt).state_dict.items()}
    torch.save({"model": other, "args": argparse.Namespace(arch="deit_tiny", base_rate=0.7)},
               tmp_path / "other.pth")
    result = run_cli("check", tiny_idle_onnx, "--ckpt", tmp_path / "other.pth", "--batch", "2",
                     "--inputs", "noise")
    assert result.exit_code == 1
    assert "FAILED" in result.stdout and "sha256 differs" in result.stdout


def _all_commands():
    from typer.main import get_command

    root = get_command(app)
    stack = [((), root)]
    while stack:
        path, cmd = stack.pop()
        sub = getattr(cmd, "commands", None)
        if sub:
            stack += [((*path, name), c) for name, c in sub.items()]
        else:
            yield path, cmd


def test_help_texts_read_like_a_manual():
    """No Python types in the help (<bool>, <list[Path]>), no {ARG} braces that look like choice
    sets, and every option says what it does."""
    commands = list(_all_commands())
    assert len(commands) >= 10
    for path, _cmd in commands:
        result = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        text = result.output
        for noise in ("<bool>", "<list", "<path>", "<str>", "<int>", "<float>", " {"):
            assert noise not in text, f"{' '.join(path)} --help shows {noise!r}"
    for path, cmd in commands:
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "option" and not param.hidden:
                assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"


def test_global_flags_after_the_command_and_debug_keeps_the_exit_code(tmp_path):
    """`idle-export onnx x.pth --debug` works where users type it, shows the traceback, and the
    exit code stays the documented 2 (bad input), not 1."""
    proc = subprocess.run([str(EXE), "onnx", str(tmp_path / "nope.pth"), "--debug"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr and "checkpoint not found" in proc.stderr
    proc = subprocess.run([str(EXE), "onnx", str(tmp_path / "nope.pth")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(error_lines(proc.stderr)) == 1
