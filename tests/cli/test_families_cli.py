"""EViT and DynamicViT through the real CLI (#27): `onnx` reads the family from the authors'
checkpoints (keys and args, no flag), never exports one family as another, writes the family
into the metadata; `check` against our torch module at batch 1, 7, 32 (FP32 max abs ≤ 1e-5,
every kept set agrees); dense and selection outputs; what is not supported exits 2 in one line;
lint, show, calibrate, serve repo and the demo; TensorRT-RTX builds (marked trt).

Small models: deit_tiny backbones (evit_tiny, dynamicvit_tiny), seeded weights with a real
spread (pruning_common.seeded_spread), in the authors' checkpoint formats."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.model.dynamicvit import DynamicViTSpec, build_dynamicvit, write_dynamicvit_demo_checkpoint
from idle_export.model.evit import EViTSpec, write_evit_demo_checkpoint
from idle_export.model.pruning_common import create_deit, seeded_spread
from idle_export.onnx.metadata import OnnxMetadata
from tests.conftest import error_lines

runner = CliRunner()
CLASSES = 10


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The authors' EViT (plain and fused) and DynamicViT checkpoints, and their exports written
    by the CLI with no family flag."""
    d = tmp_path_factory.mktemp("families")
    sd = seeded_spread(create_deit("deit_tiny", CLASSES).state_dict(), 0)
    out = {"sd": sd}
    out["evit"] = write_evit_demo_checkpoint(d / "evit.pth", EViTSpec("deit_tiny", 0.7, num_classes=CLASSES),
                                             0, sd)
    fused = EViTSpec("deit_tiny", 0.5, drop_loc=(4, 7, 10), fuse_token=True, num_classes=CLASSES)
    out["fused"] = write_evit_demo_checkpoint(d / "fused.pth", fused, 0, sd)
    torch.manual_seed(0)
    dyn = DynamicViTSpec("deit_tiny", 0.7, num_classes=CLASSES)
    out["dyn"] = write_dynamicvit_demo_checkpoint(
        d / "dyn.pth", dyn, 0, seeded_spread(build_dynamicvit(dyn).authors_state_dict(), 0))
    sel = ["--emit-selection"]
    for name, ckpt, extra in (("evit_sel", "evit", sel), ("evit_dense", "evit", ["--dense"]),
                              ("fused_sel", "fused", sel), ("dyn_sel", "dyn", sel), ("dyn_idle", "dyn", [])):
        out[name] = d / f"{name}.onnx"
        result = run_cli("onnx", out[ckpt], "-o", out[name], *extra)
        assert result.exit_code == 0, result.output
        out[name + "_log"] = result.stderr
    return out


def test_export_reads_the_family_from_the_checkpoint(files):
    assert "EViT evit_tiny keep 0.7, drop layers 3,6,9, K 138,97,68; official scores, 3 TopK" \
        in files["evit_sel_log"]
    assert "K 98,50,26, fused token" in files["fused_sel_log"]  # the fused token counts
    assert "DynamicViT dynamicvit_tiny keep 0.7, drop layers 3,6,9, K 137,96,67" in files["dyn_idle_log"]
    for name, family, arch in (("evit_sel", "evit", "evit_tiny"), ("fused_sel", "evit", "evit_tiny"),
                               ("dyn_sel", "dynamicvit", "dynamicvit_tiny"),
                               ("evit_dense", "evit", "evit_tiny")):
        meta = OnnxMetadata.read(files[name])
        assert (meta.get("family"), meta.get("arch"), meta.score_mode) == (family, arch, "official")
        assert meta.spec.arch == arch and meta.dense == (name == "evit_dense")
    assert OnnxMetadata.read(files["fused_sel"]).spec.idle_layers == (4, 7, 10)
    plain, fused, dyn, dense = (ops(files[n]) for n in ("evit_sel", "fused_sel", "dyn_sel", "evit_dense"))
    assert plain["TopK"] == fused["TopK"] == dyn["TopK"] == 3 and dense["TopK"] == 0
    assert plain["ScatterElements"] == dyn["ScatterElements"] == 0 and fused["ScatterElements"] == 3
    assert not set(plain) & {"NonZero", "Loop", "If", "Unique"}
    proto = onnx.load(str(files["dyn_sel"]), load_external_data=False)
    assert [o.name for o in proto.graph.output] == ["logits", "selection_layer3", "selection_layer6",
                                                     "selection_layer9"]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # dynamic batch
    assert [d.dim_value for d in proto.graph.output[1].type.tensor_type.shape.dim][1:] == [137]


@pytest.mark.parametrize("name", ["evit_sel", "fused_sel", "dyn_sel", "dyn_idle", "evit_dense"])
def test_check_against_torch(files, name, tmp_path):
    ckpt = files[name.split("_")[0] if not name.startswith("fused") else "fused"]
    report_path = tmp_path / "r.json"
    result = run_cli("check", files[name], "--ckpt", ckpt, "--max-abs", "1e-5", "--json", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] and not report["warnings"]
    assert [(c["inputs"], c["batch"]) for c in report["cases"]] == [
        (s, b) for s in ("noise", "photos") for b in (1, 7, 32)]
    for case in report["cases"]:
        assert case["max_abs"] <= 1e-5 and case["top1"] == 1.0
        if name != "evit_dense":
            assert case["selection"] == 1.0 and len(case["selection_per_layer"]) == 3


def test_an_evit_checkpoint_is_never_exported_as_idlevit(files, tmp_path):
    out = tmp_path / "x.onnx"
    result = run_cli("onnx", files["evit"], "--keep", "0.5", "-o", out)  # the old silent IdleViT export
    assert result.exit_code == 0 and OnnxMetadata.read(out).spec.keep_k == (98, 49, 25), result.output
    for args, message in (
            (["--arch", "deit_tiny"], "evit.pth is an EViT checkpoint; --arch deit_tiny is an IdleViT arch"),
            (["--family", "dynamicvit"], "evit.pth is not a DynamicViT checkpoint: it has no score_pre"),
            (["--scores", "folded"], "--scores folded is not a way EViT ranks tokens"),
            (["--plugin"], "--plugin is not supported for EViT models"),
            (["--elastic"], "--elastic is not supported for EViT models"),
            (["--keep-k", "100,50,20"], "--keep-k set idle layers; an EViT model's drop layers"),
            (["--family", "vit"], "--family 'vit' is not one of idlevit, evit, dynamicvit")):
        out.unlink(missing_ok=True)
        result = run_cli("onnx", files["evit"], "-o", out, *args)
        lines = error_lines(result.stderr)
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.output)
        assert "Traceback" not in result.output and not out.exists()
    result = run_cli("onnx", files["dyn"], "-o", out, "--family", "idlevit", "--keep", "0.7")
    assert result.exit_code == 2 and "unexpected keys: score_predictor" in result.stderr, result.output
    # an explicit --family idlevit exports the EViT checkpoint's DeiT weights as IdleViT
    result = run_cli("onnx", files["evit"], "-o", out, "--family", "idlevit", "--keep", "0.7")
    assert result.exit_code == 0 and OnnxMetadata.read(out).get("family") == "deit", result.output


def test_lint_and_show(files, tmp_path):
    for name in ("evit_sel", "fused_sel", "dyn_sel"):
        result = run_cli("lint", files[name], "--expect-idle")
        assert result.exit_code == 0 and "TopK 3" in result.output, result.output
    assert run_cli("lint", files["evit_dense"], "--expect-idle").exit_code == 1
    pytest.importorskip("matplotlib")
    for model in (files["fused_sel"], files["dyn"]):
        png = tmp_path / f"{Path(model).stem}.png"
        result = run_cli("show", model, "-o", png, "--max-images", "2")
        assert result.exit_code == 0 and png.stat().st_size > 0, result.output


def test_show_maps_positions_to_patches(files):
    """The ONNX file's selections and torch's agree as patch numbers (fused token: no patch)."""
    from idle_export.explore.show import run_show

    a = run_show(files["fused_sel"], max_images=2)
    b = run_show(files["fused"], max_images=2)
    for layer in (4, 7, 10):
        assert a.kept[layer].shape == b.kept[layer].shape
        assert all(set(x) == set(y) for x, y in zip(a.kept[layer].tolist(), b.kept[layer].tolist()))
        assert a.kept[layer].max() <= 196 + 2 and a.kept[layer].min() >= 0


def test_plugin_and_elastic_engines_are_refused(files, tmp_path):
    for args, message in ((["trt", files["dyn_idle"], "--plugin", "-o", tmp_path / "x.engine"],
                           "--plugin is not supported for DynamicViT models"),
                          (["trt", files["evit_sel"], "--elastic", "-o", tmp_path / "x.engine"],
                           "--elastic is not supported for EViT models")):
        result = run_cli(*args)
        lines = error_lines(result.stderr)
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_sweep_exports_one_fixed_k_file_per_ratio(files, tmp_path):
    """EViT has no elastic form: sweep exports each ratio's fixed-K file (K from the ratio) and
    runs it against the dense export; at ratio 1 nothing is dropped, so it agrees with dense."""
    out = tmp_path / "s.json"
    result = run_cli("sweep", files["evit"], "--ratios", "0.5,1", "--num", "8", "--batch", "1", "--runs", "1",
                     "--warmup", "1", "--min-time", "0.01", "--threads", "1", "--onnx-dir", tmp_path,
                     "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {r["keep_rate"]: r for r in report["results"]}
    assert rows[0.5]["file"] != rows[1]["file"] and report["settings"]["elastic"] is None
    assert rows[1]["agreement"] == 1.0 and rows[1]["max_abs_logit_diff"] < 1e-4
    assert rows[0.5]["gmacs"] < rows[1]["gmacs"] <= report["dense"]["gmacs"] + 1e-9
    assert (tmp_path / rows[0.5]["file"]).is_file()


def test_calibrate_keeps_the_score_path_fp32(files, tmp_path):
    from idle_export.parity.check import check_onnx
    from idle_export.quantize.selection import dequantized_score_inputs

    for name in ("fused_sel", "dyn_sel"):
        out = tmp_path / f"{name}.int8.onnx"
        result = run_cli("calibrate", files[name], "-o", out, "--num", "8", "--no-cache")
        assert result.exit_code == 0, result.output
        assert dequantized_score_inputs(onnx.load(str(out))) == [False] * 3, name
        report = check_onnx(out, against=files[name], batch_sizes=[4], input_sets=["photos"])
        assert report["precision"] == "int8" and len(report["cases"][0]["selection_per_layer"]) == 3


def test_serve_repo(files, tmp_path):
    pytest.importorskip("tritonclient.http", reason="pip install idle-export[serve]")
    root = tmp_path / "repo"
    result = run_cli("serve", "repo", files["dyn_idle"], "-o", root, "--name", "dyn")
    assert result.exit_code == 0, result.output
    text = (root / "dyn" / "config.pbtxt").read_text()
    assert "idle_export.family" in text and "dynamicvit" in text


def test_bench_runs_with_the_family_flop_ideal(files, tmp_path):
    """bench on the checkpoint and its files: torch (official scores only) and ONNX Runtime; the
    FLOP ideal is EViT's MAC count (a mechanics check on one batch, not a measurement)."""
    from idle_export.model.checkpoint import load_checkpoint

    spec = load_checkpoint(files["evit"]).spec()
    out = tmp_path / "b.json"
    result = run_cli("bench", files["evit"], files["evit_sel"], files["evit_dense"], "--backend", "torch,ort",
                     "--batch", "2", "--runs", "1", "--warmup", "1", "--min-time", "0.01", "--threads", "1",
                     "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["flops"]["gmacs"]["idle"] == pytest.approx(spec.macs() / 1e9)
    assert report["flops"]["ideal"]["official"] == pytest.approx(spec.macs(dense=True) / spec.macs())
    assert {r["backend"] for r in report["results"]} == {"torch", "ort"}
    assert {r["variant"] for r in report["results"]} == {"idle", "dense"}


@pytest.mark.slow  # 20-30 s each (tiny), 80 s (small)
@pytest.mark.parametrize("arch, batch", [("evit_tiny", "1,7"), ("dynamicvit_tiny", "1,7"),
                                         ("evit_small", "1,7,32"), ("dynamicvit_small", "1,7,32")])
def test_demo(arch, batch, tmp_path):
    """Seeded, in the authors' format, exported and checked; FP32 within 1e-5 at small width
    too (seeded_spread scales with the width)."""
    result = run_cli("demo", "--arch", arch, "-o", tmp_path, "--batch", batch, "--json", tmp_path / "d.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["passed"] and [r["topk"] for r in report["rows"]] == [3, 0]
    assert report["scores"] == "official" and report["rows"][0]["selection"] == 1.0
    assert max(r["max_abs"] for r in report["rows"]) <= 1e-5


needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt_rtx is not installed (pip install idle-export[trt])")


@pytest.mark.trt
@needs_rtx
@pytest.mark.parametrize("name", ["fused_sel", "dyn_idle"])
def test_tensorrt_rtx_fp16_build(files, name, tmp_path):
    from idle_export.onnx.fp16 import precision_summary

    engine = tmp_path / f"{name}.engine"
    result = run_cli("trt", files[name], "--fp16", "--profile", "1:2:4", "--target", "sm89",
                     "--flavour", "tensorrt_rtx", "-o", engine)
    assert result.exit_code == 0, result.output
    side = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert side["precision"] == "fp16" and side["model"]["idle_export.family"]
    summary = precision_summary(onnx.load(str(tmp_path / f"{name}.fp16.onnx")))
    assert summary["topk_inputs"] == ["float"] * 3  # scores and TopK stay FP32
