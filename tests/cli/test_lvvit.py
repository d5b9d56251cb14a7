"""LV-ViT end to end through the real CLI: export (arch from the keys), check against torch
(with the stem's BatchNorm, so the folding is checked too), dense, official scores with
selection outputs, INT8 with the selection path FP32, lint, TensorRT-RTX builds, a Triton
repository, bench's FLOP ideal with the conv stem, and the demo at full size (slow).

The fast tests use narrow LV-ViTs: the official depth, schedule and 4_2 stem, width 128 (two
64-wide heads), an 8-wide stem, 96 px (36 patches), random weights and BN statistics."""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.model.checkpoint import load_checkpoint
from idle_export.model.lvvit import seeded_lvvit_state_dict

runner = CliRunner()
NARROW = dict(img_size=96, embed_dim=128, stem_width=8)
S_LAYERS = list(range(4, 16))
S_K = [25] * 4 + [17] * 4 + [12] * 4  # int(36 · 0.7**p), groups of four


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def meta(path: Path, *names: str) -> list:
    """The values of the idle_export.<name> metadata of the file."""
    from idle_export.onnx.metadata import OnnxMetadata

    m = OnnxMetadata.read(path)
    return [m.get(name) for name in names]


@pytest.fixture(scope="module")
def lv(tmp_path_factory):
    """A bare Token-Labeling-style LV-ViT-S state dict (no args) and its three exports, written
    by the CLI: idle (folded scores, the default), dense, official scores with selections."""
    d = tmp_path_factory.mktemp("lvvit")
    ckpt = d / "lvvit_s_narrow.pth"
    sd = seeded_lvvit_state_dict("lvvit_s", 10, 0, **NARROW)
    torch.save(sd, ckpt)
    # the same weights with the keep rate in args (no arch): for bench, which takes no --keep
    torch.save({"model": sd, "args": argparse.Namespace(base_rate=0.7)}, d / "with_rate.pth")
    files = {"ckpt": ckpt, "with_rate": d / "with_rate.pth"}
    for name, extra in (("idle", []), ("dense", ["--dense"]),
                        ("official", ["--scores", "official", "--emit-selection"])):
        files[name] = d / f"{name}.onnx"
        result = run_cli("onnx", ckpt, "--keep", "0.7", "-o", files[name], *extra)
        assert result.exit_code == 0, result.output
        files[name + "_log"] = result.stderr
    return files


def test_export_infers_the_arch_and_folds_batchnorm(lv):
    assert "12 TopK" in lv["idle_log"] and "lvvit_s (width 128, 16 blocks, stem 8)" in lv["idle_log"]
    assert meta(lv["idle"], "arch", "embed_dim", "depth", "num_heads", "stem_width") == [
        "lvvit_s", 128, 16, 2, 8]
    assert meta(lv["idle"], "idle_layers", "keep_k", "img_size") == [S_LAYERS, S_K, 96]
    assert meta(lv["idle"], "crop_pct", "interpolation") == [0.875, "bicubic"]  # the official eval transform
    assert meta(lv["idle"], "score_mode", "dense") == ["folded", False]
    for name in ("idle", "dense", "official"):
        counts = ops(lv[name])
        assert "BatchNormalization" not in counts and counts["Conv"] == 4  # three stem convs + proj
        assert counts["TopK"] == (0 if name == "dense" else 12)
    proto = onnx.load(str(lv["official"]))
    assert [o.name for o in proto.graph.output] == ["logits"] + [f"selection_layer{i}" for i in S_LAYERS]


@pytest.mark.parametrize("name", ["idle", "dense", "official"])
def test_check_against_torch_passes(lv, name, tmp_path):
    result = run_cli("check", lv[name], "--ckpt", lv["ckpt"], "--batch", "1,5", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and not report["warnings"]
    assert {c["inputs"] for c in report["cases"]} == {"noise", "photos"} and len(report["cases"]) == 4
    for case in report["cases"]:
        assert case["max_abs"] <= 1e-4 and case["top1"] == 1.0
        if name != "dense":
            assert case["selection"] == 1.0 and sorted(map(int, case["selection_per_layer"])) == S_LAYERS


def test_lvvit_m_from_model_dict(tmp_path):
    """{'model': sd} of a narrow LV-ViT-M: 20 blocks say lvvit_m; layers 5..19 in groups of five."""
    ckpt = tmp_path / "m.pth"
    torch.save({"model": seeded_lvvit_state_dict("lvvit_m", 10, 1, **NARROW)}, ckpt)
    out = tmp_path / "m.onnx"
    result = run_cli("onnx", ckpt, "--keep", "0.7", "-o", out)
    assert result.exit_code == 0, result.output
    assert meta(out, "arch", "idle_layers") == ["lvvit_m", list(range(5, 20))]
    assert meta(out, "keep_k") == [[25] * 5 + [17] * 5 + [12] * 5] and ops(out)["TopK"] == 15
    result = run_cli("check", out, "--ckpt", ckpt, "--batch", "3")
    assert result.exit_code == 0 and "PASSED" in result.stdout, result.output


def test_wrong_arch_is_one_line_exit_2(lv, tmp_path):
    for arch, message in (("lvvit_m", "weights do not fit lvvit_m: lvvit_s_narrow.pth has 16 blocks"),
                          ("deit_small", "weights do not fit deit_small: size mismatch")):
        result = run_cli("onnx", lv["ckpt"], "--keep", "0.7", "--arch", arch, "-o", tmp_path / "x.onnx")
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
        assert errors[0].endswith(("(hint: pass --arch lvvit_s)", "look like lvvit_s: pass --arch lvvit_s)"))
        assert "Traceback" not in result.output
        assert not (tmp_path / "x.onnx").exists()


def test_calibrate_keeps_the_selection_path_fp32(lv, tmp_path):
    from idle_export.parity.check import check_onnx
    from idle_export.quantize.selection import dequantized_score_inputs, selection_path_nodes

    out = tmp_path / "idle.int8.onnx"
    result = run_cli("calibrate", lv["idle"], "-o", out, "--num", "16", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "score path FP32 in 12/12 idle layers" in result.stderr
    proto = onnx.load(str(out))
    assert dequantized_score_inputs(proto) == [False] * 12
    # no activation on the selection path is quantized: its only Q/DQ nodes dequantize a
    # weight (Wq, which the idle layer's q projection shares and quantizes), as for DeiT
    kept = set(selection_path_nodes(proto))
    producers = {o: n for n in proto.graph.node for o in n.output}
    weights = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.name in kept and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert node.op_type == "DequantizeLinear" and node.input[0] in weights, node.name
        if node.op_type == "TopK":
            assert producers[node.input[0]].op_type != "DequantizeLinear"
        if node.op_type in ("GatherElements", "ScatterElements"):  # token indices stay int64
            assert producers[node.input[1]].op_type not in ("DequantizeLinear", "QuantizeLinear")
    counts = ops(out)
    assert counts["QuantizeLinear"] > 50 and counts["TopK"] == 12
    assert meta(out, "precision") == ["int8"]
    report = check_onnx(out, against=lv["idle"], batch_sizes=[4], input_sets=["photos"])
    case = report["cases"][0]  # random weights: no accuracy claim, but a real, sane INT8 model
    assert report["precision"] == "int8" and np.isfinite(case["max_abs"]) and case["max_abs"] > 0
    assert sorted(map(int, case["selection_per_layer"])) == S_LAYERS


def test_lint(lv):
    result = run_cli("lint", lv["idle"], "--expect-idle")
    assert result.exit_code == 0 and "TopK 12" in result.output, result.output
    assert run_cli("lint", lv["dense"]).exit_code == 0
    assert run_cli("lint", lv["dense"], "--expect-idle").exit_code == 1


needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt_rtx is not installed (pip install idle-export[trt])")


@pytest.mark.trt
@needs_rtx
def test_tensorrt_rtx_fp16_and_int8_builds(lv, tmp_path):
    from idle_export.onnx.fp16 import precision_summary

    engine = tmp_path / "idle.engine"
    result = run_cli("trt", lv["idle"], "--fp16", "--profile", "1:2:4", "--target", "sm89",
                     "--flavour", "tensorrt_rtx", "-o", engine)
    assert result.exit_code == 0, result.output
    side = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert side["precision"] == "fp16" and side["profiles"][0]["min"] == [1, 3, 96, 96]
    summary = precision_summary(onnx.load(str(tmp_path / "idle.fp16.onnx")))
    assert summary["topk_inputs"] == ["float"] * 12  # scores and TopK stay FP32
    qdq = tmp_path / "idle.int8.trt.onnx"
    result = run_cli("calibrate", lv["idle"], "--target", "trt", "-o", qdq, "--num", "8", "--no-cache")
    assert result.exit_code == 0, result.output
    int8 = tmp_path / "idle_int8.engine"
    result = run_cli("trt", qdq, "--int8", "--profile", "1:2:4", "--target", "sm89",
                     "--flavour", "tensorrt_rtx", "-o", int8)
    assert result.exit_code == 0, result.output
    assert json.loads(int8.with_name(int8.name + ".json").read_text())["precision"] == "int8"


def test_serve_repo(lv, tmp_path):
    pytest.importorskip("tritonclient.http", reason="pip install idle-export[serve]")
    from idle_export.serve.config import parse_config

    root = tmp_path / "repo"
    result = run_cli("serve", "repo", lv["idle"], "-o", root, "--name", "lvvit_s")
    assert result.exit_code == 0, result.output
    config = parse_config((root / "lvvit_s" / "config.pbtxt").read_text())
    assert list(config.input[0].dims) == [3, 96, 96] and config.output[0].name == "logits"
    params = {k: v.string_value.strip('"') for k, v in config.parameters.items()}
    assert params["idle_export.arch"] == "lvvit_s" and params["idle_export.stem_width"] == "8"
    assert (root / "lvvit_s" / "1" / "model.onnx").read_bytes() == lv["idle"].read_bytes()


def test_bench_flop_ideal_counts_the_stem(lv, tmp_path):
    """The ideal comes from ModelSpec.macs, which counts the conv stem and the aux head; it
    agrees with a count of every Conv/MatMul/Gemm in the graphs, and the torch backend runs."""
    from tests.bench.test_bench import graph_macs

    spec = load_checkpoint(lv["ckpt"]).spec(keep_rate=0.7)
    for name, dense, folded in (("idle", False, True), ("official", False, False), ("dense", True, False)):
        counted = graph_macs(lv[name], spec)
        assert abs(spec.macs(dense=dense, folded_scores=folded) - counted) / counted < 0.02, name
    out = tmp_path / "b.json"
    result = run_cli("bench", lv["with_rate"], lv["idle"], lv["dense"], "--backend", "torch,ort",
                     "--batch", "2", "--runs", "1", "--warmup", "1", "--min-time", "0.01", "--threads", "1",
                     "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    flops = report["flops"]
    stem = spec.embed_macs() / 1e9
    assert flops["gmacs"]["dense"] == pytest.approx(spec.macs(dense=True) / 1e9)
    assert flops["ideal"]["folded"] == pytest.approx(flops["gmacs"]["dense"] / flops["gmacs"]["idle_folded"])
    blocks_only = (flops["gmacs"]["dense"] - stem) / (flops["gmacs"]["idle_folded"] - stem)
    assert 1.0 < flops["ideal"]["folded"] < blocks_only  # the stem is not shrunk by idle layers
    assert {r["backend"] for r in report["results"]} == {"torch", "ort"}
    refused = run_cli("bench", lv["with_rate"], "--backend", "torch-official", "--official-repo", tmp_path)
    assert refused.exit_code == 2 and "runs the authors' DeiT code" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch, topk", [("lvvit_s", 12), ("lvvit_m", 15)])
def test_demo_full_size(arch, topk, tmp_path):
    """The real LV-ViT-S/M (224 px, 64-wide stem), seeded, in the official training format."""
    out = tmp_path / "demo"
    result = run_cli("demo", "--arch", arch, "-o", out, "--batch", "1,3", "--json", tmp_path / "d.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["passed"] and [r["topk"] for r in report["rows"]] == [topk, 0]
    ckpt = load_checkpoint(report["checkpoint"])
    assert ckpt.args["arch"] == arch and ckpt.source == "model" and ckpt.spec().family == "lvvit"
    assert report["rows"][0]["max_abs"] <= 1e-4 and report["rows"][0]["selection"] == 1.0
