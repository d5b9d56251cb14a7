import argparse
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from idle_export.errors import CheckpointError
from idle_export.model.checkpoint import load_checkpoint
from idle_export.model.config import ModelSpec
from idle_export.model.vit import build_model, create_vit


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return create_vit(ModelSpec.create("deit_tiny", 0.7)).state_dict()


def test_training_checkpoint_with_ema_and_args(tmp_path, tiny_sd):
    ema = {k: v + 1.0 for k, v in tiny_sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tiny_sd, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 3}, "epoch": 3, "scaler": {"scale": 1024.0},
                "args": argparse.Namespace(arch="deit_tiny", base_rate=0.5, lr=1e-3)}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.source == "model" and ckpt.arch == "deit_tiny" and ckpt.keep_rate == 0.5
    assert torch.equal(ckpt.state_dict["cls_token"], tiny_sd["cls_token"])
    spec = ckpt.spec()
    assert spec.keep_k == ModelSpec.create("deit_tiny", 0.5).keep_k
    ema_ckpt = load_checkpoint(path, ema=True)
    assert ema_ckpt.source == "model_ema"
    assert torch.equal(ema_ckpt.state_dict["cls_token"], ema["cls_token"])
    assert ckpt.spec(keep_rate=0.7).keep_k[0] == 137  # --keep overrides args.base_rate


@pytest.mark.parametrize("form", ["model", "state_dict", "bare", "module_prefix", "safetensors",
                                  "safetensors.SAFETENSORS", "safetensors.pth"])
def test_weight_forms(tmp_path, tiny_sd, form):
    if form.startswith("safetensors"):  # told by its content, whatever the name
        from safetensors.torch import save_file

        path = tmp_path / f"w.{form.partition('.')[2] or 'safetensors'}"
        save_file({k: v.contiguous() for k, v in tiny_sd.items()}, str(path))
    else:
        obj = {"model": tiny_sd, "state_dict": {"state_dict": tiny_sd}, "bare": tiny_sd,
               "module_prefix": {"model": {f"module.{k}": v for k, v in tiny_sd.items()}}}[form]
        if form == "state_dict":
            obj = obj["state_dict"]
        path = tmp_path / "w.pth"
        torch.save(obj, path)
    ckpt = load_checkpoint(path)
    assert ckpt.arch == "deit_tiny"  # from the weights' width
    assert ckpt.keep_rate is None
    with pytest.raises(Exception, match="no keep rate"):
        ckpt.spec()
    model = build_model(ckpt.spec(keep_rate=0.7), ckpt.state_dict)
    assert torch.equal(model.vit.pos_embed, tiny_sd["pos_embed"])


def test_num_classes_from_head(tmp_path):
    spec = ModelSpec.create("deit_tiny", 0.7, num_classes=10)
    torch.save({"model": create_vit(spec).state_dict(),
                "args": argparse.Namespace(arch="deit_tiny", base_rate=0.7)}, tmp_path / "c.pth")
    assert load_checkpoint(tmp_path / "c.pth").spec().num_classes == 10


def _lvvit_meta_sd(arch: str) -> dict:
    """The state dict of a full-size LV-ViT, shapes only (nothing allocated)."""
    from idle_export.model.lvvit import LVViT

    with torch.device("meta"):
        return LVViT(arch).state_dict()


@pytest.mark.parametrize("arch", ["lvvit_s", "lvvit_m"])
def test_lvvit_arch_inferred_from_keys(arch):
    """No args: the conv stem (patch_embed.conv1) says LV-ViT, width and depth say which."""
    from idle_export.model.checkpoint import Checkpoint, infer_arch

    sd = _lvvit_meta_sd(arch)
    assert infer_arch(sd) == arch
    ckpt = Checkpoint(path=Path(f"{arch}.pth"), sha256="", state_dict=sd, source="file")
    spec = ckpt.spec(keep_rate=0.7)
    want = {"lvvit_s": (384, 16, 6, range(4, 16), 4), "lvvit_m": (512, 20, 8, range(5, 20), 5)}[arch]
    assert (spec.family, spec.embed_dim, spec.depth, spec.num_heads, spec.stem_width) == (
        "lvvit", *want[:3], 64)
    assert spec.idle_layers == tuple(want[3])
    g = want[4]  # the official groups of G idle layers per power of r
    assert spec.keep_k == (137,) * g + (96,) * g + (67,) * g
    assert spec.describe().startswith(f"{arch} keep 0.7, idle layers {want[3][0]},")


def test_lvvit_wrong_arch_names_the_right_one(tmp_path, tiny_sd):
    from idle_export.model.checkpoint import Checkpoint

    small = Checkpoint(path=Path("s.pth"), sha256="", state_dict=_lvvit_meta_sd("lvvit_s"), source="file",
                       args={"arch": "lvvit_m", "base_rate": 0.7})
    with pytest.raises(CheckpointError, match="do not fit lvvit_m: s.pth has 16 blocks, lvvit_m 20") as e:
        small.spec()
    assert e.value.hint == "pass arch=lvvit_s"
    # DeiT weights labelled LV-ViT (and the other way round) are named, not guessed
    torch.save({"model": tiny_sd, "args": argparse.Namespace(arch="lvvit_s", base_rate=0.7)},
               tmp_path / "lv.pth")
    with pytest.raises(CheckpointError, match="weights do not fit lvvit_s: lv.pth has no LV-ViT") as e:
        load_checkpoint(tmp_path / "lv.pth").spec()
    assert e.value.hint == "the weights look like deit_tiny: pass arch=deit_tiny"
    deit = Checkpoint(path=Path("m.pth"), sha256="", state_dict=_lvvit_meta_sd("lvvit_m"), source="file",
                      args={"arch": "deit_base", "base_rate": 0.7})
    with pytest.raises(CheckpointError, match="weights do not fit deit_base") as e:
        build_model(deit.spec(), deit.state_dict)
    assert e.value.hint == "the weights look like lvvit_m: pass arch=lvvit_m"


@pytest.mark.parametrize("form", ["bare", "model", "official"])
def test_narrow_lvvit_weights_forms(tmp_path, form):
    """A narrow LV-ViT-S (width 128, 16 blocks, 8-wide stem, 64 px): the bare Token-Labeling
    state dict, {'model': sd} and the official training checkpoint all load; the dims come
    from the weights, the heads from LV-ViT's 64-wide heads."""
    from idle_export.model.build import build_model as build_any
    from idle_export.model.lvvit import seeded_lvvit_state_dict

    sd = seeded_lvvit_state_dict("lvvit_s", 10, 0, img_size=64, embed_dim=128, stem_width=8)
    obj = {"bare": sd, "model": {"model": sd},
           "official": {"model": sd, "model_ema": sd, "epoch": 1,
                        "args": argparse.Namespace(arch="lvvit_s", base_rate=0.5)}}[form]
    torch.save(obj, tmp_path / "lv.pth")
    ckpt = load_checkpoint(tmp_path / "lv.pth")
    assert ckpt.arch == "lvvit_s" and ckpt.img_size == 64 and ckpt.num_classes == 10
    spec = ckpt.spec(keep_rate=None if form == "official" else 0.5)
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.stem_width) == (128, 16, 2, 8)
    assert spec.keep_k == (8,) * 4 + (4,) * 4 + (2,) * 4  # int(16 · 0.5**p)
    assert spec.describe().startswith("lvvit_s (width 128, 16 blocks, stem 8) keep 0.5")
    model = build_any(spec, ckpt.state_dict, fold_bn=False)
    assert torch.equal(model.patch_embed.bn1.running_var, sd["patch_embed.bn1.running_var"])
    assert model.spec is spec and len(model.idle_blocks) == 12


def test_trained_photos10_checkpoint(photos10_ckpt):
    ckpt = load_checkpoint(photos10_ckpt)
    spec = ckpt.spec()
    assert (spec.arch, spec.num_classes, spec.keep_rate) == ("deit_tiny", 10, 0.7)
    assert ckpt.classes[0] == "astronaut"


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="will not unpickle"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned_marker").exists()
    # the old (non-zip) torch.save format and plain pickles of every protocol: the same refusal,
    # naming the object, and no warning from torch about the pickle protocol
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": _Evil()}, legacy, _use_new_zipfile_serialization=False)
    raws = [legacy]
    for protocol in (2, 4, 5):
        raws.append(tmp_path / f"evil{protocol}.pkl")
        raws[-1].write_bytes(pickle.dumps({"model": _Evil()}, protocol=protocol))
    for raw in raws:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(CheckpointError, match=r"refers to the Python object posix\.system, which "
                               "idle-export will not unpickle"):
                load_checkpoint(raw)
    assert not (tmp_path / "pwned_marker").exists()
    ints = tmp_path / "ints.pkl"  # a plain pickle with no object in it: torch's reason, not its preamble
    ints.write_bytes(pickle.dumps({"a": 1}, protocol=5))
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint \(the unpickler stopped at: "
                       r"Unsupported operand 149\)$"):
        load_checkpoint(ints)


def test_bad_files(tmp_path, tiny_sd):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "notes.txt").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    good = tmp_path / "good.pth"
    torch.save({"model": tiny_sd}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")
    torch.save({"epoch": 3}, tmp_path / "noweights.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_checkpoint(tmp_path / "noweights.pth")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_checkpoint(good, ema=True)


def test_wrong_architecture_names_the_keys(tmp_path, tiny_sd):
    torch.save({"model": tiny_sd, "args": argparse.Namespace(arch="deit_small", base_rate=0.7)},
               tmp_path / "c.pth")
    ckpt = load_checkpoint(tmp_path / "c.pth")
    pattern = r"size mismatch for: cls_token \(checkpoint \[1, 1, 192\]"
    with pytest.raises(CheckpointError, match=pattern) as e:
        build_model(ckpt.spec(), ckpt.state_dict)
    assert "pass arch=deit_tiny" in e.value.one_line()
    partial = {k: v for k, v in tiny_sd.items() if not k.startswith("blocks.11.")}
    partial["head_extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.11\..*unexpected keys: head_extra"):
        build_model(ModelSpec.create("deit_tiny", 0.7), partial)


def test_distilled_deit_is_refused_by_name(tmp_path, tiny_sd):
    """dist_token / head_dist: DeiT's distilled variant, a different model: one line saying so."""
    for extra in ({"dist_token": torch.zeros(1, 1, 192)}, {"head_dist.weight": torch.zeros(1000, 192),
                                                           "head_dist.bias": torch.zeros(1000)}):
        torch.save({"model": {**tiny_sd, **extra}}, tmp_path / "d.pth")
        ckpt = load_checkpoint(tmp_path / "d.pth")
        with pytest.raises(CheckpointError, match=r"the weights are a distilled DeiT \((dist_token|"
                           r"head_dist\.weight)\), which idle-export does not support") as e:
            build_model(ckpt.spec(keep_rate=0.7), ckpt.state_dict)
        assert "non-distilled checkpoint" in e.value.hint
