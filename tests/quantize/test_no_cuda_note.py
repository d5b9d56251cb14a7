"""`calibrate --target openvino` on a machine with a CUDA toolkit and no GPU: NNCF imports
torch.utils.cpp_extension, which logs "No CUDA runtime is found, using CUDA_HOME=…" on import.
That one record is dropped at its logger; the logger's other records still pass."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import logging, sys
if sys.argv[1] == "quiet":
    from idle_export.quantize.openvino_int8 import quiet_no_cuda_runtime_note
    quiet_no_cuda_runtime_note()
import torch.utils.cpp_extension
logging.getLogger("torch.utils.cpp_extension").warning("another warning of that logger")
"""


@pytest.mark.parametrize("mode", ["quiet", "as_torch_does"])
def test_no_cuda_runtime_note_is_dropped_and_nothing_else(tmp_path, mode):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU: it logs no such note")
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}  # a CUDA toolkit folder, as torch looks for one
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "another warning of that logger" in result.stderr
    assert ("No CUDA runtime is found" in result.stderr) == (mode == "as_torch_does"), result.stderr
