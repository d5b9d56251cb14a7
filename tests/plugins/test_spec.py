"""Pure rules of the fused ops (spec.py), the numpy reference, and light imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.plugins import REPO, load_module

spec = load_module("spec")
ref = load_module("reference")


def test_op_identity():
    assert (spec.DOMAIN, spec.OP_SELECT, spec.OP_SCATTER, spec.OP_VERSION) == (
        "idle_export", "IdleSelect", "IdleScatter", 1)
    assert spec.plugin_id("IdleSelect") == "idle_export::IdleSelect"
    assert spec.plugin_id("IdleScatter") == "idle_export::IdleScatter"
    with pytest.raises(ValueError):
        spec.plugin_id("TopK")
    assert spec.trt_onnx_attributes("IdleSelect", 137) == {
        "plugin_namespace": "idle_export", "aot": 1, "k": 137}
    assert spec.trt_onnx_attributes("IdleScatter") == {"plugin_namespace": "idle_export", "aot": 1}
    with pytest.raises(ValueError):
        spec.trt_onnx_attributes("IdleSelect")


def test_select_shapes_and_bounds():
    assert spec.select_output_shapes(64, 197, 384, 137) == ((64, 138), (64, 138, 384),
                                                             (64, 138, 384))
    assert spec.select_output_shapes(1, 2, 3, 1) == ((1, 2), (1, 2, 3), (1, 2, 3))
    sym = object()  # a symbolic batch passes through unvalidated
    assert spec.select_output_shapes(sym, 7, 4, 6)[0] == (sym, 7)
    assert spec.select_output_shapes(sym, None, 4, 6)[1] == (sym, 7, 4)  # N unknown yet
    for b, n, c, k, msg in [(1, 7, 4, 0, "K must"), (1, 7, 4, 7, "K must"), (1, 1, 4, 1, "N "),
                            (1, 4096, 4, 5, "N "), (-1, 7, 4, 3, "batch"), (1, 7, 0, 3, "channels"),
                            (1, 7.0, 4, 3, "ints"), (1, None, 4, 0, "K must")]:
        with pytest.raises(ValueError, match=msg):
            spec.select_output_shapes(b, n, c, k)


def test_scatter_shapes_and_bounds():
    assert spec.scatter_output_shape(3, 13, 8, 6) == (3, 13, 8)
    assert spec.scatter_output_shape(3, 13, 8, 13) == (3, 13, 8)
    for s in (0, 14):
        with pytest.raises(ValueError, match="S "):
            spec.scatter_output_shape(3, 13, 8, s)


def test_dtype_rules():
    assert spec.select_output_dtypes("float32", "fp16", np.dtype(np.float32)) == (
        "int64", "float32", "float16")
    assert spec.dtype_name("torch.float16") == "float16"
    assert spec.scatter_output_dtype("float16", "int64", "half") == "float16"
    with pytest.raises(ValueError, match="xn must be float32 or float16"):
        spec.select_output_dtypes("int64", "float32", "float32")
    with pytest.raises(ValueError, match="w must be float32 or float16"):
        spec.select_output_dtypes("float32", "float32", "bfloat16")
    with pytest.raises(ValueError, match="idx must be int64"):
        spec.scatter_output_dtype("float32", "int32", "float32")
    with pytest.raises(ValueError, match="res must have the dtype of x"):
        spec.scatter_output_dtype("float32", "int64", "float16")


def test_next_pow2_and_cdiv():
    assert [spec.next_pow2(v) for v in (0, 1, 2, 3, 13, 16, 197, 577)] == [
        1, 1, 2, 4, 16, 16, 256, 1024]
    assert spec.cdiv(197, 16) == 13 and spec.cdiv(16, 16) == 1
    with pytest.raises(ValueError):
        spec.next_pow2(2.5)


@pytest.mark.parametrize("n,c,k", [(197, 384, 137), (197, 384, 67), (577, 384, 403), (13, 8, 5),
                                   (7, 5, 6), (2, 3, 1), (2048, 768, 1000), (50, 1000, 3)])
def test_block_sizes(n, c, k):
    sel = spec.select_block_sizes(n, c, k)
    assert sel.block_n >= n and sel.block_n == spec.next_pow2(sel.block_n) >= 16
    for v in (sel.block_c, sel.block_i, sel.block_g):
        assert v >= 1 and v == spec.next_pow2(v)
    assert sel.block_c <= spec.next_pow2(c) and sel.block_n * sel.block_c <= spec.TILE_ELEMS
    assert sel.block_n * sel.block_g <= spec.TILE_ELEMS and sel.block_i <= sel.block_n
    assert sel.block_n % sel.block_i == 0 and sel.num_warps in (4, 8)
    assert set(sel.constexprs()) == {"BLOCK_N", "BLOCK_C", "BLOCK_I", "BLOCK_G"}
    sc = spec.scatter_block_sizes(n, c, k + 1)
    assert sc.block_s >= k + 1 and sc.block_r * sc.block_s <= 4096
    assert sc.block_r * sc.block_c <= spec.TILE_ELEMS and sc.num_warps == 4
    assert spec.threads_per_block(sel.num_warps) == 32 * sel.num_warps


def test_launch_grids():
    assert spec.select_grid(64) == (64, 1, 1)
    blocks = spec.scatter_block_sizes(197, 384, 138)
    assert spec.scatter_grid(64, 197, blocks) == (64, spec.cdiv(197, blocks.block_r), 1)
    assert spec.launch_grid("IdleSelect", 8, 197, 384, 137) == (8, 1, 1)
    assert spec.launch_grid("IdleScatter", 8, 197, 384, 137) == spec.scatter_grid(
        8, 197, spec.scatter_block_sizes(197, 384, 138))
    with pytest.raises(ValueError):
        spec.launch_grid("IdleSelect", 8, 197, 384, 197)


def test_reference_select_ties_and_layout():
    xn = np.zeros((2, 7, 3), np.float32)
    xn[:, 1:, 1] = [1, 3, 3, 2, 3, 1]
    w = np.array([[0, 1, 0], [0, 2, 0]], np.float32)
    x = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)
    idx, xn_sel, x_sel = ref.idle_select_reference(xn, x, w, 4)
    assert idx.dtype == np.int64 and idx.tolist() == [[0, 2, 3, 5, 4]] * 2
    assert np.array_equal(x_sel, x[np.arange(2)[:, None], idx])
    assert np.array_equal(xn_sel, xn[np.arange(2)[:, None], idx])
    assert ref.idle_select_reference(xn, x, w, 6)[0].tolist() == [[0, 2, 3, 5, 4, 1, 6]] * 2


def test_reference_matches_torch_model_math():
    """Folded scores + topk as in model.IdleBlock.select (no ties in random data)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    xn = rng.standard_normal((3, 13, 16)).astype(np.float32)
    w = rng.standard_normal((3, 16)).astype(np.float32)
    scores = torch.matmul(torch.from_numpy(w)[:, None], torch.from_numpy(xn)[:, 1:].transpose(1, 2))
    top = torch.topk(scores.squeeze(1), 5, dim=1).indices + 1
    assert ref.idle_select_reference(xn, xn, w, 5)[0][:, 1:].tolist() == top.tolist()


def test_reference_scatter():
    x = np.zeros((1, 5, 2), np.float32)
    res = np.arange(8, dtype=np.float32).reshape(1, 4, 2)
    out = ref.scatter_reference(x, np.array([[0, 3, 3, 1]]), res)
    assert out[0].tolist() == [[0, 1], [6, 7], [0, 0], [4, 5], [0, 0]]  # later position wins
    assert x.sum() == 0  # input untouched
    with pytest.raises(ValueError, match="idx must lie"):
        ref.scatter_reference(x, np.array([[0, 5, 1, 2]]), res)
    with pytest.raises(ValueError):
        ref.scatter_reference(x, np.array([[0, 1]]), res)


def test_rank_score_gap():
    scores = np.array([[1.0, 3.0, 3.0 + 1e-7, 2.0]])
    assert ref.rank_score_gap(scores, np.array([[0, 2, 3]]), np.array([[0, 3, 2]])) < 1e-6
    gap = ref.rank_score_gap(scores, np.array([[0, 2, 3]]), np.array([[0, 2, 4]]))
    assert gap == pytest.approx(1.0, abs=1e-6)


def test_imports_stay_light():
    """spec, reference, aot, tensorrt_plugin and gpu_check import no torch, triton or tensorrt."""
    code = ("import sys; from tests.plugins import load_module\n"
            "for m in ('spec', 'reference', 'aot', 'tensorrt_plugin', 'gpu_check'): load_module(m)\n"
            "print(sorted(m for m in ('torch', 'triton', 'tensorrt') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
