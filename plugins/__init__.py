"""Fused IdleViT idle-layer kernels (Triton) and their TensorRT plugin.

An idle layer keeps the CLS token and the K patch tokens that score highest against the CLS
query (folded scores: ``score_j = xn_j · w`` with ``w = q_cls @ Wk``), runs the block on those
K+1 rows and scatters the result back. This package fuses the two memory-bound steps:

* ``IdleSelect``  (xn, x, w; attribute k) -> (idx int64 [B,K+1], xn_sel, x_sel): scores,
  top-K with CLS first (ties prefer the lower token index, like ONNX Runtime's TopK) and the
  gather of the kept rows, in one kernel.
* ``IdleScatter`` (x, idx, res) -> out: ``out = x`` with the rows ``idx`` replaced by ``res``.

Modules (importing this package imports nothing heavy; each module imports what it needs):

* :mod:`.spec`             pure shape/dtype rules, validation, block sizes and launch grids
* :mod:`.reference`        numpy reference of both ops (the tests' ground truth)
* :mod:`.kernels`          the ``@triton.jit`` kernels and torch launch wrappers
* :mod:`.aot`              ahead-of-time compilation to PTX/cubin for sm_80/86/89/90
* :mod:`.tensorrt_plugin`  TensorRT Quickly Deployable Plugin registration (``aot_impl``)
* :mod:`.gpu_check`        correctness + timing run for a CUDA machine (JSON line)

Installed as ``idle_export.plugins``; the modules only import each other relatively.
"""

from .spec import DOMAIN, OP_SCATTER, OP_SELECT, OP_VERSION

__all__ = ["DOMAIN", "OP_SCATTER", "OP_SELECT", "OP_VERSION"]
