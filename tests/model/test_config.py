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
