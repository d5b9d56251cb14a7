"""Property-based fuzzing (hypothesis, bounded example counts) of what reads user input: the
option parsers, the ONNX metadata reader and the checkpoint loader. Whatever comes in, the
result is a value or a one-line BadInputError, never another exception (which the CLI would
report as an internal error, exit 4)."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idle_export.cli.options import batch_list, byte_size, finite, int_list
from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec, canonical_arch, check_keep_rate
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.trt.flavour import parse_target
from idle_export.trt.inputs import parse_profile

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
numbers = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True))


def only_bad_input(fn, *args, **kwargs):
    """fn's value, or None when it refused the input with a one-line BadInputError."""
    try:
        return fn(*args, **kwargs)
    except BadInputError as e:
        line = e.one_line()
        assert line and "\n" not in line
        return None


@FUZZ
@given(st.one_of(text, st.lists(st.integers(-10**6, 10**7), max_size=6).map(lambda v: ",".join(map(str, v)))))
def test_batch_and_int_lists(value):
    sizes = only_bad_input(batch_list, value)
    if sizes is not None:
        assert sizes and all(1 <= s <= 4096 for s in sizes)
    only_bad_input(int_list, value, "--idle-layers")


@FUZZ
@given(st.one_of(text, st.tuples(*[st.integers(-5, 10**8)] * 3).map(lambda v: ":".join(map(str, v)))))
def test_profiles(value):
    profile = only_bad_input(parse_profile, value)
    if profile is not None:
        lo, opt, hi = profile
        assert 1 <= lo <= opt <= hi <= 4096


@FUZZ
@given(st.tuples(text, text, text))
def test_trtexec_shapes(shapes):
    only_bad_input(parse_profile, shapes=shapes, chw=(3, 224, 224))


@FUZZ
@given(st.one_of(text, st.tuples(st.integers(-10, 10**16), st.sampled_from(["", "k", "MiB", "gb", "T", " m"]))
                 .map(lambda v: f"{v[0]}{v[1]}")))
def test_byte_sizes(value):
    size = only_bad_input(byte_size, value, "--http-max-input-size")
    assert size is None or (isinstance(size, int) and size >= 0)


@FUZZ
@given(text)
def test_targets_and_arch_names(value):
    only_bad_input(parse_target, value)
    only_bad_input(canonical_arch, value)


@FUZZ
@given(numbers)
def test_finite_numbers_and_keep_rates(value):
    kept = only_bad_input(finite, value, "--max-abs")
    if kept is not None:
        assert math.isfinite(kept) and kept >= 0
    rate = only_bad_input(check_keep_rate, value)
    if rate is not None:
        assert 0 < rate <= 1


@FUZZ
@given(st.sampled_from(["deit_tiny", "deit_small", "deit_base", "x"]), st.one_of(st.none(), numbers),
       st.one_of(st.none(), st.lists(st.integers(-3, 30), max_size=12)),
       st.one_of(st.none(), st.lists(st.integers(-3, 300), max_size=12)))
def test_model_specs(arch, keep, layers, keep_k):
    spec = only_bad_input(ModelSpec.create, arch, keep, idle_layers=layers, keep_k=keep_k)
    if spec is not None:
        assert all(0 <= layer < spec.depth for layer in spec.idle_layers)
        assert all(1 <= k <= spec.num_patches for k in spec.keep_k)


@FUZZ
@given(st.dictionaries(st.sampled_from(["idle_export.arch", "idle_export.keep_k", "idle_export.idle_layers",
                                         "idle_export.dense", "idle_export.precision", "idle_export.classes",
                                         "idle_export.score_mode", "idle_export.keep_rate",
                                         "idle_export.img_size", "other"]),
                       st.one_of(text, st.sampled_from(['"deit_tiny"', "[3, 4, 5]", "[137, 96, 67]", "true",
                                                        '["a", "b"]', "224", "null", "{}", "[[1]]"])),
                       max_size=8))
def test_metadata_reader(props):
    meta = OnnxMetadata(props)
    for field in ("dense", "score_mode", "precision", "idle_layers", "classes", "has_spec"):
        only_bad_input(getattr, meta, field)
    if meta.has_spec:
        try:
            assert meta.spec.arch
        except BadInputError:
            pass
        except (TypeError, ValueError, KeyError) as e:  # pragma: no cover - the failure to find
            pytest.fail(f"metadata {props} raised {type(e).__name__}: {e}")


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=2000))
def test_checkpoint_loader_on_random_bytes(data):
    from idle_export.model.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.pth"
        path.write_bytes(data)
        only_bad_input(load_checkpoint, path)
        safe = Path(d) / "x.safetensors"
        safe.write_bytes(data)
        only_bad_input(load_checkpoint, safe)


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.sampled_from(["cls_token", "pos_embed", "head.weight", "blocks.0.attn.qkv.weight",
                                         "patch_embed.proj.weight", "norm.weight", "x"]),
                       st.lists(st.integers(1, 5), min_size=0, max_size=3), max_size=5),
       st.one_of(st.none(), st.sampled_from(["deit_tiny", "lvvit_s", "nope", 3])),
       st.one_of(st.none(), numbers, text),
       st.sampled_from(["model", "state_dict", "model_ema", None]))
def test_checkpoint_loader_on_odd_structures(shapes, arch, base_rate, key):
    """Checkpoints that unpickle safely but hold anything: odd keys and shapes, an args.arch
    that is no architecture, a base_rate that is no number."""
    import torch

    from idle_export.model.checkpoint import load_checkpoint

    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    obj = sd if key is None else {key: sd, "args": argparse.Namespace(arch=arch, base_rate=base_rate)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.pth"
        torch.save(obj, path)
        ckpt = only_bad_input(load_checkpoint, path)
        if ckpt is not None:
            only_bad_input(ckpt.spec)
