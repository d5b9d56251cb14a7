"""model.build: one build_model for both families, with the interface the export and the
runners read (.spec, .dense, .emit_selection, .idle_blocks with recorded scores)."""

from __future__ import annotations

import numpy as np
import torch

from idle_export.model.build import build_model, seeded_state_dict
from idle_export.model.config import ModelSpec
from idle_export.model.lvvit import LVViT
from idle_export.model.vit import IdleViT
from idle_export.runtime.torch import TorchRunner

# a narrow LV-ViT-S: the official depth, stem and schedule at width 128 (2 heads), 64 px
NARROW = dict(embed_dim=128, depth=16, num_heads=2, stem_width=8)


def narrow_spec(keep: float = 0.7) -> ModelSpec:
    return ModelSpec.create("lvvit_s", keep, num_classes=10, img_size=64, dims=NARROW)


def test_family_dispatch_and_interface():
    deit = ModelSpec.create("deit_tiny", 0.7, num_classes=10)
    model = build_model(deit, seeded_state_dict(deit), emit_selection=True)
    assert isinstance(model, IdleViT) and model.spec is deit and len(model.idle_blocks) == 9
    spec = narrow_spec()
    lv = build_model(spec, seeded_state_dict(spec), emit_selection=True)
    assert isinstance(lv, LVViT) and lv.spec is spec and not lv.dense and lv.emit_selection
    assert [b.keep for b in lv.idle_blocks] == list(spec.keep_k)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lv.modules())  # folded for export
    dense = build_model(spec, seeded_state_dict(spec), dense=True)
    assert dense.dense and dense.idle_blocks == [] and dense.spec is spec


def test_folded_model_equals_the_checkpoint_with_batchnorm():
    spec = narrow_spec()
    sd = seeded_state_dict(spec, seed=3)
    assert sd["patch_embed.bn2.running_var"].std() > 0.1  # random BN statistics, really folded
    with_bn = build_model(spec, sd, fold_bn=False, emit_selection=True)
    assert isinstance(with_bn.patch_embed.bn1, torch.nn.BatchNorm2d)
    folded = build_model(spec, sd, emit_selection=True)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, *sel_ref = with_bn(x)
        got, *sel_got = folded(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a.sort(1).values, b.sort(1).values) for a, b in zip(sel_ref, sel_got))


def test_seeded_weights_are_deterministic():
    spec = narrow_spec()
    a, b, c = seeded_state_dict(spec, 0), seeded_state_dict(spec, 0), seeded_state_dict(spec, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_torch_runner_records_lvvit_scores():
    """TorchRunner gives LV-ViT's selections (patch indices) and the scores behind them."""
    spec = narrow_spec()
    runner = TorchRunner(build_model(spec, seeded_state_dict(spec), fold_bn=False), selection=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with runner:
        out = runner.infer({"images": x})
    assert out["logits"].shape == (2, 10)
    assert sorted(k for k in out if k != "logits") == sorted(f"selection_layer{i}" for i in spec.idle_layers)
    assert len(runner.last_scores) == 12
    for layer, k, scores in zip(spec.idle_layers, spec.keep_k, runner.last_scores):
        kept = out[f"selection_layer{layer}"]
        assert kept.shape == (2, k) and scores.shape == (2, 16)
        for b in range(2):  # the kept patches are the top-K scores
            assert set(kept[b]) == set(np.argsort(-scores[b])[:k])
