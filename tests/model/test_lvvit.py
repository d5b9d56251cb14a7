"""LV-ViT: the torch model equals an independent float64 reference, keep=1.0 equals dense,
BatchNorm folding changes nothing, the official checkpoint keys load strictly, the ONNX
export matches torch, and the MAC count includes the conv stem."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from idle_export.model.families import LVVIT
from idle_export.model.lvvit import (
    LVViT,
    fold_batchnorm,
    lvvit_k_by_layer,
    lvvit_keep_k,
    lvvit_macs,
    lvvit_stem_macs,
    seeded_lvvit_state_dict,
)
from tests.lvvit_reference import reference_forward
from tests.onnx.test_export import topk_ks

# A small LV-ViT: the official stem and blocks at toy widths, 8×8 = 64 patch tokens.
TINY = dict(img_size=128, embed_dim=48, depth=6, num_heads=3, stem_width=8)
TINY_N = 64
TINY_IDLE = {2: 1, 3: 1, 4: 2, 5: 3}  # idle layer → exponent p of keep**p


def tiny_k(keep: float) -> dict[int, int]:
    return {layer: int(TINY_N * keep**p) for layer, p in TINY_IDLE.items()}


def build(sd: dict, keep_k: dict[int, int] | None, *, arch: str = "lvvit_s", num_classes: int = 10,
          dims: dict | None = None, **kwargs) -> LVViT:
    model = LVViT(arch, num_classes, keep_k=keep_k, **(TINY if dims is None else dims), **kwargs)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def images(batch: int, seed: int, size: int = 128, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def official_keys(depth: int) -> list[str]:
    """The state-dict keys of the authors' IdleLVViT(p_emb='4_2', return_dense=True), in order."""
    keys = ["cls_token", "pos_embed"]
    for i in (1, 2, 3):
        keys.append(f"patch_embed.conv{i}.weight")
        keys += [f"patch_embed.bn{i}.{n}"
                 for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys += ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    for b in range(depth):
        keys += [f"blocks.{b}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    return keys + ["norm.weight", "norm.bias", "head.weight", "head.bias", "aux_head.weight", "aux_head.bias"]


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize("arch, depth, dim", [("lvvit_s", 16, 384), ("lvvit_m", 20, 512)])
def test_official_state_dict_keys_load_strictly(arch, depth, dim):
    model = LVViT(arch)
    sd = model.state_dict()
    assert list(sd) == official_keys(depth)
    shapes = {"pos_embed": (1, 197, dim), "patch_embed.conv1.weight": (64, 3, 7, 7),
              "patch_embed.conv2.weight": (64, 64, 3, 3), "patch_embed.proj.weight": (dim, 64, 8, 8),
              "blocks.0.attn.qkv.weight": (3 * dim, dim), "blocks.0.mlp.fc1.weight": (3 * dim, dim),
              "head.weight": (1000, dim), "aux_head.weight": (1000, dim)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    if arch == "lvvit_s":
        model.load_state_dict(seeded_lvvit_state_dict(arch, 1000, seed=0), strict=True)


def test_keep_k_follows_the_official_rule():
    for arch, group in (("lvvit_s", 4), ("lvvit_m", 5)):
        for r in (0.5, 0.7, 0.9):
            # infer.py: keep_ratios = [r**(i+1) for i in range(3) for _ in range(G)], K = int(196 * ratio)
            want = tuple(int(196 * r ** (i + 1)) for i in range(3) for _ in range(group))
            assert lvvit_keep_k(arch, r) == want
    assert lvvit_keep_k("lvvit_s", 0.7) == (137,) * 4 + (96,) * 4 + (67,) * 4
    assert lvvit_keep_k("lvvit_m", 1.0) == (196,) * 15
    assert list(lvvit_k_by_layer("lvvit_s", 0.7)) == list(range(4, 16))
    assert list(lvvit_k_by_layer("lvvit_m", 0.7)) == list(range(5, 20))
    assert LVVIT.archs["lvvit_m"]["embed_dim"] == 512 and LVVIT.archs["lvvit_m"]["num_heads"] == 8


@pytest.mark.parametrize("kwargs", [dict(score_mode="fast"), dict(keep_k={2: 0}), dict(keep_k={2: 65}),
                                    dict(keep_k={6: 4}), dict(img_size=120)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        LVViT("lvvit_s", 10, **{**TINY, **kwargs})
    with pytest.raises(ValueError):
        LVViT("lvvit_l")


# ------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep", [0.4, 0.5, 0.7, 1.0])
def test_idle_model_equals_reference(seed, keep):
    sd = seeded_lvvit_state_dict("lvvit_s", 10, seed, **TINY)
    k_by_layer = tiny_k(keep)
    model = build(sd, k_by_layer, emit_selection=True).double()
    batch = 4 if seed == 0 else 2
    x = images(batch, 100 + seed)
    with torch.no_grad():
        logits, *selections = model(x)
    assert len(selections) == len(k_by_layer)
    for b in range(batch):
        ref_logits, ref_kept = reference_forward(sd, depth=6, num_heads=3, k_by_layer=k_by_layer, image=x[b])
        torch.testing.assert_close(logits[b], ref_logits, rtol=1e-9, atol=1e-9)
        for (layer, k), sel in zip(k_by_layer.items(), selections):
            assert sel.shape == (batch, k + 1) and sel.dtype == torch.int64
            assert sel[b, 0].item() == 0  # CLS always kept, first
            assert sorted((sel[b, 1:] - 1).tolist()) == ref_kept[layer], f"layer {layer} sample {b}"


def test_real_lvvit_s_shape_equals_reference():
    """The real LV-ViT-S: 224 px, 64-wide stem, 14×14 tokens, 16 blocks, idle layers 4..15 at r=0.7."""
    sd = seeded_lvvit_state_dict("lvvit_s", 1000, seed=3)
    k_by_layer = lvvit_k_by_layer("lvvit_s", 0.7)
    model = build(sd, k_by_layer, num_classes=1000, dims={}, emit_selection=True).double()
    x = images(1, 7, size=224)
    with torch.no_grad():
        logits, *selections = model(x)
    ref_logits, ref_kept = reference_forward(sd, depth=16, num_heads=6, k_by_layer=k_by_layer, image=x[0])
    torch.testing.assert_close(logits[0], ref_logits, rtol=1e-9, atol=1e-9)
    assert [s.shape[1] for s in selections] == [k + 1 for k in lvvit_keep_k("lvvit_s", 0.7)]
    for layer, sel in zip(k_by_layer, selections):
        assert sorted((sel[0, 1:] - 1).tolist()) == ref_kept[layer], f"layer {layer}"


def test_reference_is_sensitive_to_selection():
    """Guard for the tests above: with these weights idle and dense logits differ clearly."""
    sd = seeded_lvvit_state_dict("lvvit_s", 10, 0, **TINY)
    x = images(1, 5)[0]
    idle, _ = reference_forward(sd, depth=6, num_heads=3, k_by_layer=tiny_k(0.5), image=x)
    dense, _ = reference_forward(sd, depth=6, num_heads=3, k_by_layer={}, image=x)
    assert (idle - dense).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_keep_one_equals_dense(seed):
    sd = seeded_lvvit_state_dict("lvvit_s", 10, seed, **TINY)
    x = images(3, seed)
    dense = build(sd, None, emit_selection=True).double()
    assert dense.dense and not dense.emit_selection
    with torch.no_grad():
        for mode in ("official", "folded"):
            idle = build(sd, tiny_k(1.0), score_mode=mode).double()
            assert set(tiny_k(1.0).values()) == {TINY_N}
            torch.testing.assert_close(idle(x), dense(x), rtol=1e-10, atol=1e-10)


def test_folded_scores_select_the_same_tokens():
    sd = seeded_lvvit_state_dict("lvvit_s", 10, 5, **TINY)
    x = images(4, 5)
    with torch.no_grad():
        off, *sel_o = build(sd, tiny_k(0.6), emit_selection=True).double()(x)
        fol, *sel_f = build(sd, tiny_k(0.6), emit_selection=True, score_mode="folded").double()(x)
    torch.testing.assert_close(off, fol, rtol=1e-9, atol=1e-9)
    for a, b in zip(sel_o, sel_f):
        assert torch.equal(a.sort(1).values, b.sort(1).values)


def test_unselected_tokens_pass_through():
    """An idle block leaves unselected tokens bit-identical and changes the selected ones."""
    model = build(seeded_lvvit_state_dict("lvvit_s", 10, 2, **TINY), tiny_k(0.5))
    block = model.blocks[3]
    x = torch.randn(2, TINY_N + 1, 48)
    with torch.no_grad():
        out, idx = block(x)
    mask = torch.zeros(2, TINY_N + 1, dtype=torch.bool).scatter_(1, idx, True)
    assert int(mask.sum()) == 2 * (block.keep + 1)
    assert torch.equal(out[~mask], x[~mask])
    assert not torch.equal(out[mask], x[mask])


def test_fold_batchnorm_equals_unfolded():
    sd = seeded_lvvit_state_dict("lvvit_s", 10, 4, **TINY)
    model = build(sd, tiny_k(0.7), emit_selection=True).double()
    folded = fold_batchnorm(model)
    pe = folded.patch_embed
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert all(getattr(pe, f"conv{i}").bias is not None for i in (1, 2, 3))
    assert isinstance(model.patch_embed.bn1, torch.nn.BatchNorm2d)  # the original is untouched
    assert fold_batchnorm(folded).state_dict().keys() == folded.state_dict().keys()  # idempotent
    x = images(3, 11)
    with torch.no_grad():
        ref, *sel_ref = model(x)
        got, *sel_got = folded(x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(sel_ref, sel_got))
    # the real 64-wide stem at 224 in float32 (the precision the export runs in)
    real = LVViT("lvvit_s")
    real.load_state_dict(seeded_lvvit_state_dict("lvvit_s", 1000, 1))
    real.eval()
    x = images(2, 12, size=224, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(real).patch_embed(x), real.patch_embed(x),
                                   rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("score_mode", ["official", "folded"])
def test_onnx_export_matches_torch(score_mode, tmp_path):
    import onnx
    import onnxruntime as ort

    sd = seeded_lvvit_state_dict("lvvit_s", 10, 6, **TINY)
    k_by_layer = tiny_k(0.7)
    model = build(sd, k_by_layer, emit_selection=True, score_mode=score_mode)
    export = fold_batchnorm(model)
    path = tmp_path / "lvvit.onnx"
    names = [f"selection_{layer}" for layer in k_by_layer]
    with torch.no_grad():
        torch.onnx.export(export, (torch.zeros(2, 3, 128, 128),), str(path), dynamo=True, opset_version=18,
                          input_names=["images"], output_names=["logits", *names],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          external_data=False, verbose=False, optimize=True)
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["TopK"] == len(k_by_layer) and ops["ScatterElements"] == len(k_by_layer)
    assert "BatchNormalization" not in ops and ops["Conv"] == 4
    assert topk_ks(proto) == list(k_by_layer.values())
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = images(batch, 20 + batch, dtype=torch.float32)
        logits, *selections = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref, *ref_sel = model(x)
        assert logits.shape == (batch, 10)
        assert np.abs(logits - ref.numpy()).max() <= 1e-4
        for got, want in zip(selections, ref_sel):
            assert got.dtype == np.int64 and got.shape == tuple(want.shape)
            assert np.array_equal(np.sort(got, 1), want.sort(1).values.numpy())


# ------------------------------------------------------------------------------------ MACs


def test_macs_count_the_stem_and_shrink_when_idle():
    c, n, hidden, classes = 384, 197, 1152, 1000
    stem = 112 * 112 * 64 * (3 * 49 + 64 * 9 + 64 * 9) + 196 * 384 * 64 * 64
    assert lvvit_stem_macs("lvvit_s") == stem
    dense_block = n * c * 3 * c + 2 * n * n * c + n * c * c + 2 * n * c * hidden
    heads = c * classes + 196 * c * classes  # head on CLS, aux_head on every patch token
    dense = lvvit_macs("lvvit_s", None, dense=True)
    assert dense == stem + 16 * dense_block + heads
    assert 6.5e9 < dense < 6.6e9  # LV-ViT-S: 6.6 G "FLOPs" (MACs) in the Token Labeling paper
    ks = lvvit_keep_k("lvvit_s", 0.7)
    official = lvvit_macs("lvvit_s", ks)
    folded = lvvit_macs("lvvit_s", ks, score_mode="folded")
    assert official == lvvit_macs("lvvit_s", lvvit_k_by_layer("lvvit_s", 0.7))
    assert folded < official < dense
    assert lvvit_macs("lvvit_s", ks, dense=True) == dense
    idle_blocks = 0
    for k in ks:
        s = k + 1
        select = c * c + n * c * c + n * c  # q_cls, keys of every token, q_cls·k
        idle_blocks += select + s * c * 2 * c + 2 * s * s * c + s * c * c + 2 * s * c * hidden
    assert official == stem + 4 * dense_block + idle_blocks + heads
    # the stem is not shrunk: its share of the idle model is larger than of the dense one
    assert stem / official > stem / dense > 0.2
    assert lvvit_macs("lvvit_m", lvvit_keep_k("lvvit_m", 0.7)) < lvvit_macs("lvvit_m", None, dense=True)
