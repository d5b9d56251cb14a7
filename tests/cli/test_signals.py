"""Ctrl+C and SIGTERM (timeout, docker stop, a CI cancel) stop a command cleanly: exit 130 / 143,
no output file, no temporary folder left, even inside a TensorRT build, which swallows a
KeyboardInterrupt raised in its Python callbacks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("idle-export")
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def _run_and_signal(args, cwd, sig, wait_for: str, delay: float = 0.5, timeout: float = 180.0):
    """Start idle-export, send `sig` once `wait_for` shows on stderr, return (code, stderr)."""
    import threading

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(EXE), *map(str, args)], cwd=cwd, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    start = time.monotonic()
    while not any(wait_for in line for line in lines):
        if proc.poll() is not None or time.monotonic() - start > timeout:
            proc.kill()
            pytest.fail(f"the command ended before {wait_for!r} showed: {''.join(lines)}")
        time.sleep(0.05)
    time.sleep(delay)  # well inside the step
    proc.send_signal(sig)
    proc.wait(timeout=timeout)
    reader.join(timeout=10)
    return proc.returncode, "".join(lines)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_export_interrupted_leaves_nothing(tiny_ckpt, tmp_path, sig, code):
    shutil.copy(tiny_ckpt, tmp_path / "ckpt.pth")
    rc, err = _run_and_signal(["onnx", "ckpt.pth", "-o", "out.onnx"], tmp_path, sig, "· exporting")
    assert rc == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]  # no output, no temp folder


@pytest.mark.trt
@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed "
                    "(pip install tensorrt-rtx-cu13==1.7.1.116)")
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_engine_build_interrupted_stops_and_writes_nothing(demo_dense_onnx, tmp_path, sig, code):
    """Through the CLI: a signal during `trt` (parsing, the FP16 graph or the build) exits with
    the signal's code and leaves no engine, sidecar or FP16 graph."""
    shutil.copy(demo_dense_onnx, tmp_path / "m.onnx")
    rc, err = _run_and_signal(["trt", "m.onnx", "--fp16", "--target", "sm89", "-o", "m.engine"], tmp_path,
                              sig, "using TensorRT-RTX", delay=0.3)
    assert rc == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


_SIGNAL_IN_BUILD = """
import os, signal, sys, threading
from pathlib import Path
import idle_export.trt.build as build_mod
from idle_export.trt.build import build_engine

started = threading.Event()

class Watched(build_mod.Interruptible):
    def monitor(self):
        inner = super().monitor()
        base = type(inner)

        class Step(base):
            def step_complete(self, phase_name, step):
                started.set()
                return inner.step_complete(phase_name, step)

        return Step()

build_mod.Interruptible = Watched
threading.Thread(target=lambda: started.wait(120) and os.kill(os.getpid(), signal.SIGINT),
                 daemon=True).start()
try:
    build_engine(sys.argv[1], precision="fp16", batch=(1, 2, 4), target="sm89",
                 output=Path(sys.argv[2]) / "x.engine", flavour="tensorrt_rtx")
except KeyboardInterrupt:
    print("cancelled", started.is_set())
    sys.exit(0)
print("built")
sys.exit(2)
"""


@pytest.mark.trt
@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed "
                    "(pip install tensorrt-rtx-cu13==1.7.1.116)")
def test_a_signal_inside_tensorrt_cancels_the_build(tiny_idle_onnx, tmp_path):
    """Inside TensorRT's build, where a KeyboardInterrupt raised in a Python callback would be
    swallowed (and the engine written anyway): the signal arrives once TensorRT reports its first
    build step, the build is cancelled, nothing is written. In a fresh Python process, as a CLI
    run is: in the test session's own process, after ~200 other tests with in-process TensorRT
    builds, TensorRT-RTX's cancelled build segfaulted twice (alone it passes)."""
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "signal_in_build.py"
    script.write_text(_SIGNAL_IN_BUILD)
    done = subprocess.run([sys.executable, str(script), str(tiny_idle_onnx), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "cancelled True" in done.stdout, done.stdout + done.stderr[-2000:]
    assert list(out.iterdir()) == []  # no engine, no sidecar, no FP16 graph


@pytest.fixture(scope="module")
def demo_dense_onnx(tmp_path_factory):
    """A DeiT-S dense export (random weights): its TensorRT build takes seconds, not milliseconds."""
    from idle_export.demo import write_demo_checkpoint
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.onnx.export import export_checkpoint

    d = tmp_path_factory.mktemp("deit_s")
    ckpt = load_checkpoint(write_demo_checkpoint(d / "s.pth", arch="deit_small"))
    return export_checkpoint(ckpt, ckpt.spec(), d / "s_dense.onnx", dense=True)
