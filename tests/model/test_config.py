import math

import pytest

from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec


def test_deit_small_default_schedule():
    spec = ModelSpec.create("deit_small", 0.7)
    assert spec.idle_layers == tuple(range(3, 12))
    assert spec.keep_k == (137, 137, 137, 96, 96, 96, 67, 67, 67)
    # the official rule, Python floats: int(196 * 0.7**2) = int(96.04) and int(196 * 0.7**3) = 67
    assert spec.keep_k[3] == int(196 * 0.7**2) and spec.keep_k[6] == int(196 * 0.7**3)


def test_training_schedule_and_explicit_lists():
    train = ModelSpec.create("deit_base", 0.7, schedule="train")
    assert train.idle_layers == tuple(range(4, 12))
    assert train.keep_k == (137, 137, 137, 96, 96, 96, 67, 67)
    custom = ModelSpec.create("deit_tiny", 0.5, idle_layers=[2, 6, 10, 11])
    assert custom.keep_k == (98, 98, 98, 49)
    explicit = ModelSpec.create("deit_tiny", None, idle_layers=[5, 9], keep_k=[100, 50])
    assert explicit.k_by_layer == {5: 100, 9: 50} and explicit.keep_rate is None


def test_timm_names_accepted():
    assert ModelSpec.create("deit_small_patch16_224", 0.7).arch == "deit_small"


@pytest.mark.parametrize("rate", [0, -0.1, 1.01, math.nan, "x"])
def test_bad_keep_rate(rate):
    with pytest.raises(BadInputError, match="keep rate"):
        ModelSpec.create("deit_small", rate)


@pytest.mark.parametrize("layers, match", [([3, 12], "out of range"), ([-1], "out of range"),
                                           ([3, 3], "repeat")])
def test_bad_idle_layers(layers, match):
    with pytest.raises(BadInputError, match=match):
        ModelSpec.create("deit_small", 0.7, idle_layers=layers)


def test_rate_too_small_for_one_token():
    with pytest.raises(BadInputError, match="keep 0 of 196"):
        ModelSpec.create("deit_small", 0.1)


def test_missing_keep_rate_and_unknown_arch():
    with pytest.raises(BadInputError, match="no keep rate"):
        ModelSpec.create("deit_small", None)
    with pytest.raises(BadInputError, match="unknown architecture"):
        ModelSpec.create("resnet50", 0.7)


def test_metadata_round_trip():
    spec = ModelSpec.create("deit_tiny", 0.5, schedule="train", num_classes=10)
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec


def test_flop_model_deit_small():
    spec = ModelSpec.create("deit_small", 0.7)
    assert spec.macs(dense=True) / 1e9 == pytest.approx(4.60, abs=0.005)
    assert spec.macs() / 1e9 == pytest.approx(3.01, abs=0.005)
    assert spec.macs(dense=True) / spec.macs() == pytest.approx(1.53, abs=0.005)
    assert spec.macs(dense=True) / spec.macs(folded_scores=True) == pytest.approx(1.60, abs=0.005)
    half = ModelSpec.create("deit_small", 0.5)
    assert half.macs(dense=True) / half.macs() == pytest.approx(1.97, abs=0.005)
    assert half.macs(dense=True) / half.macs(folded_scores=True) == pytest.approx(2.14, abs=0.005)


def test_lvvit_schedules_follow_the_official_scripts():
    """LV-ViT: infer.py and main.py agree (S: layers 4..15 in groups of four, M: 5..19 in groups
    of five), so --schedule does not change them; explicit layers use the arch's group size."""
    s = ModelSpec.create("lvvit_s", 0.7)
    assert (s.family, s.embed_dim, s.depth, s.num_heads, s.stem_width) == ("lvvit", 384, 16, 6, 64)
    assert s.idle_layers == tuple(range(4, 16))
    assert s.keep_k == (137,) * 4 + (96,) * 4 + (67,) * 4
    assert ModelSpec.create("lvvit_s", 0.7, schedule="train") == s
    m = ModelSpec.create("lvvit_medium", 0.7)
    assert m.arch == "lvvit_m" and m.idle_layers == tuple(range(5, 20))
    assert m.keep_k == (137,) * 5 + (96,) * 5 + (67,) * 5
    assert ModelSpec.create("lvvit_m", 0.5, idle_layers=[5, 6, 7, 8, 9, 10]).keep_k == (98,) * 5 + (49,)
    with pytest.raises(BadInputError, match="idle layer 16 is out of range for lvvit_s"):
        ModelSpec.create("lvvit_s", 0.7, idle_layers=[4, 16])
    with pytest.raises(BadInputError, match="unknown architecture 'lvvit_l'"):
        ModelSpec.create("lvvit_l", 0.7)


def test_lvvit_metadata_round_trip_and_deit_metadata_unchanged():
    narrow = ModelSpec.create("lvvit_m", 0.7, num_classes=10, img_size=96,
                              dims=dict(embed_dim=128, depth=20, num_heads=2, stem_width=8))
    meta = narrow.to_metadata()
    assert meta["idle_export.stem_width"] == "8"
    assert ModelSpec.from_metadata(meta) == narrow
    deit = ModelSpec.create("deit_tiny", 0.7).to_metadata()
    assert "idle_export.stem_width" not in deit and ModelSpec.from_metadata(deit).stem_width == 0


def test_flop_model_lvvit_counts_the_stem():
    """LV-ViT-S r=0.7: the conv stem (1.35 GMACs, a fifth of the dense model) and the aux
    head over every patch token are counted; idle layers shrink neither."""
    spec = ModelSpec.create("lvvit_s", 0.7)
    stem = 112 * 112 * 64 * (3 * 49 + 2 * 64 * 9) + 196 * 384 * 64 * 64
    assert spec.embed_macs() == stem
    dense, idle, folded = spec.macs(dense=True), spec.macs(), spec.macs(folded_scores=True)
    assert dense / 1e9 == pytest.approx(6.55, abs=0.01) and stem / dense > 0.2
    heads = 197 * 384 * 1000
    blocks_dense = dense - stem - heads
    assert idle - stem - heads < 0.7 * blocks_dense  # the blocks shrink …
    assert 1 < dense / idle < blocks_dense / (idle - stem - heads)  # … the whole model less so
    assert folded < idle
