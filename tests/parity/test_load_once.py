"""A command reads each input once per runtime session (#23 point 3): counted with an audit hook
on `open` in a fresh Python process (hooks cannot be removed from the test's own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

COUNT_OPENS = r"""
import collections, json, sys
watched = set(json.loads(sys.argv[1]))
opens = collections.Counter()
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0] in watched:
        opens[args[0]] += 1
sys.addaudithook(hook)
from idle_export.cli import run
sys.argv = ["idle-export", *json.loads(sys.argv[2])]
code = None
try:
    run()
except SystemExit as e:
    code = e.code
print("OPENS" + json.dumps({"opens": opens, "code": code}))
"""


def opens_of(files: list[Path], args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", COUNT_OPENS, json.dumps([str(f) for f in files]),
                           json.dumps([str(a) for a in args])], capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("OPENS")), None)
    assert line, done.stdout + done.stderr
    result = json.loads(line[5:])
    assert result["code"] in (0, None), done.stdout + done.stderr
    return {Path(k).name: v for k, v in result["opens"].items()}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from idle_export.data.inputs import _photos

    folder = tmp_path_factory.mktemp("photos")
    for i, img in enumerate(_photos()[:3]):
        img.save(folder / f"p{i}.png")
    return folder


def test_check_reads_the_file_and_checkpoint_once(tiny_idle_onnx, tiny_ckpt, photo_dir):
    """check --ckpt with --images: one read of the ONNX file (the candidate's session gets that
    model), one of the checkpoint (hashed and loaded from the same bytes), one session each for
    the input sets and the images (before: 3 and 3)."""
    opens = opens_of([tiny_idle_onnx, tiny_ckpt], ["check", tiny_idle_onnx, "--ckpt", tiny_ckpt, "--batch",
                                                   "1", "--inputs", "noise", "--images", photo_dir])
    assert opens == {tiny_idle_onnx.name: 1, tiny_ckpt.name: 1}


def test_bench_reads_each_file_once_on_onnx_runtime(tiny_idle_onnx, tiny_dense_onnx):
    opens = opens_of([tiny_idle_onnx, tiny_dense_onnx],
                     ["bench", tiny_idle_onnx, tiny_dense_onnx, "--backend", "ort", "--batch", "1",
                      "--runs", "1", "--warmup", "1", "--min-time", "0.01", "--threads", "1"])
    assert opens == {tiny_idle_onnx.name: 1, tiny_dense_onnx.name: 1}
