"""idle-export bench: the FLOP model against the graph, report structure, errors, the ORT
passes' parity, the official code as a backend. Timed figures are never asserted (the CPU is
shared); only structure and robust facts are."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export.cli import app

MIRROR = Path("/work/.mirror/Ackesnal+IdleViT/repo")
FAST = dict(runs=2, warmup=1, min_time=0.02)


# ----------------------------------------------------------------------------- FLOP model
def graph_macs(path: Path, spec) -> int:
    """MACs of one image counted from the graph: every MatMul/Gemm/Conv, with the operand shapes
    ONNX Runtime actually sees at batch 1 (all their inputs made graph outputs)."""
    import onnx
    import onnxruntime as ort

    from idle_export.data.inputs import seeded_noise

    proto = onnx.load(str(path))
    init = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    constant = set(init)  # not per image: weight-only work (the folded score weight Wqᵀ·Wk), folded at load
    for n in proto.graph.node:
        if all(i in constant for i in n.input if i):
            constant.update(n.output)
    nodes = [n for n in proto.graph.node
             if n.op_type in ("MatMul", "Gemm", "Conv") and n.output[0] not in constant]
    wanted = {i for n in nodes for i in list(n.input[:2]) + [n.output[0]] if i and i not in init}
    existing = {o.name for o in proto.graph.output}
    for name in sorted(wanted - existing):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = dict(zip(names, (v.shape for v in sess.run(names, {"images": seeded_noise(1, spec)})),
                      strict=True))
    shapes.update(init)
    total = 0
    for n in nodes:
        a, b, out = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(b[1:]))
        elif n.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            total += int(np.prod(out)) * (a[0] if trans_a else a[-1])
        else:
            total += int(np.prod(out)) * a[-1]
    return total


@pytest.mark.parametrize("dense,mode", [(False, "official"), (False, "folded"), (True, "official")])
def test_flop_model_matches_graph_op_count(request, tiny_ckpt, tmp_path, dense, mode):
    from idle_export.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_ckpt)
    spec = ckpt.spec()
    fixture = ("tiny_dense_onnx" if dense else
               {"official": "tiny_idle_onnx", "folded": "tiny_folded_onnx"}[mode])
    path = request.getfixturevalue(fixture)
    counted = graph_macs(path, spec)
    model = spec.macs(dense=dense, folded_scores=mode == "folded")
    assert abs(model - counted) / counted < 0.02, (model, counted)
    if not dense:  # and the idle graph really is cheaper by the modelled factor
        assert counted < 0.7 * spec.macs(dense=True)


def test_flop_ideals_deit_small_match_the_issue():
    from idle_export.bench.variants import flop_model
    from idle_export.model.config import ModelSpec

    f = flop_model(ModelSpec.create("deit_small", 0.7))
    assert f["gmacs"]["dense"] == pytest.approx(4.60, abs=0.01)
    assert f["gmacs"]["idle"] == pytest.approx(3.01, abs=0.01)
    assert f["ideal"]["official"] == pytest.approx(1.53, abs=0.01)
    assert f["ideal"]["folded"] == pytest.approx(1.60, abs=0.01)
    f5 = flop_model(ModelSpec.create("deit_small", 0.5))
    assert f5["ideal"]["official"] == pytest.approx(1.97, abs=0.01)
    assert f5["ideal"]["folded"] == pytest.approx(2.14, abs=0.01)


# ----------------------------------------------------------------------------- report
def test_bench_report_structure(tiny_idle_onnx, tiny_dense_onnx, tmp_path):
    from idle_export.bench.run import run_bench

    report = run_bench([tiny_idle_onnx, tiny_dense_onnx], backends=["ort"], batches=[1, 2], threads=1,
                       independent=True, optimize=True, **FAST)
    assert report["settings"]["threads"] == 1 and report["settings"]["optimize"] is True
    assert "bias_gelu" in report["settings"]["passes"]["ort"]
    # portable files (no passes in them): --optimize applied the ort target's passes in memory
    assert all(r["passes_in_file"] == [] and r["target"] == "portable" and "bias_gelu" in r["passes_at_load"]
               for r in report["results"])
    env = report["environment"]
    assert env["cpu"] and env["versions"]["onnxruntime"] and env["versions"]["numpy"]
    assert {(r["variant"], r["batch"]) for r in report["results"]} == {
        (v, b) for v in ("idle", "dense") for b in (1, 2)}
    for r in report["results"]:
        assert r["backend"] == "ort" and r["images_per_s"] > 0 and len(r["runs_images_per_s"]) == 2
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["calls"] == 2 * r["iters_per_run"] and r["spread"] >= 0
    ideal = report["flops"]["gmacs"]["dense"] / report["flops"]["gmacs"]["idle"]
    assert report["flops"]["ideal"]["official"] == pytest.approx(ideal)
    comps = report["comparisons"]
    assert [c["batch"] for c in comps] == [1, 2]
    for c in comps:
        idle = next(r for r in report["results"] if r["variant"] == "idle" and r["batch"] == c["batch"])
        dense = next(r for r in report["results"] if r["variant"] == "dense" and r["batch"] == c["batch"])
        assert c["speedup"] == pytest.approx(idle["images_per_s"] / dense["images_per_s"])
        assert c["achieved_over_ideal"] == pytest.approx(c["speedup"] / ideal)
    ind = report["independent"]
    assert len(ind) == 4 and all(c["images_per_s"] > 0 and c["ratio"] > 0 for c in ind)
    json.dumps(report)  # serialisable as is

    # a busy machine is said plainly: figures whose run-to-run spread exceeds 10% are flagged
    import io

    from rich.console import Console

    from idle_export.bench.report import NOISY_SPREAD, noisy_results, print_report

    def printed(rep):
        buf = io.StringIO()
        print_report(rep, Console(file=buf, width=200))
        return buf.getvalue()

    quiet = json.loads(json.dumps(report))
    for r in quiet["results"]:
        r["spread"] = NOISY_SPREAD / 2
    assert noisy_results(quiet["results"]) == [] and "noisy timing" not in printed(quiet)
    busy = json.loads(json.dumps(quiet))
    busy["results"][1]["spread"] = 0.39
    assert "noisy timing: 1 of 4 figures vary by more than 10%" in printed(busy)
    assert "worst 39%" in printed(busy)
    assert report["noise"]["spread_threshold"] == NOISY_SPREAD
    assert report["noise"]["noisy"] == [f"ort:{r['variant']}@{r['batch']}" for r in report["results"]
                                        if r["spread"] > NOISY_SPREAD]


def test_bench_cli_checkpoint_torch_json_and_plot(tiny_ckpt, tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    res = CliRunner().invoke(app, ["bench", str(tiny_ckpt), "--backend", "torch", "--batch", "1",
                                   "--runs", "1", "--warmup", "1", "--min-time", "0.01",
                                   "--threads", "1", "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert {r["variant"] for r in report["results"]} == {"idle", "idle-folded", "dense"}
    assert {c["variant"]: c["ideal"] for c in report["comparisons"]} == pytest.approx(
        {"idle": report["flops"]["ideal"]["official"], "idle-folded": report["flops"]["ideal"]["folded"]})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_bench_json_to_stdout_is_pure_json(tiny_ckpt, tiny_idle_onnx, tiny_dense_onnx):
    res = CliRunner().invoke(app, ["bench", str(tiny_idle_onnx), str(tiny_dense_onnx), "--batch", "1",
                                   "--runs", "1", "--warmup", "1", "--min-time", "0.01", "--threads", "1",
                                   "--json", "-"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["settings"]["batch"] == [1] and len(report["results"]) == 2


@pytest.mark.parametrize("args,code,words", [
    (["--batch", "0"], 2, "--batch"),
    (["--backend", "tpu"], 2, "unknown backend"),
    (["--scores", "magic"], 2, "--scores"),
    (["--runs", "0"], 2, "--runs"),
    (["--backend", "torch"], 2, "needs the checkpoint"),
    (["--backend", "torch-official"], 2, "needs the checkpoint"),
    (["--plot", "/nonexistent/dir/p.png"], 2, "does not exist"),
])
def test_bench_bad_input(tiny_idle_onnx, tiny_dense_onnx, args, code, words):
    res = CliRunner().invoke(app, ["bench", str(tiny_idle_onnx), str(tiny_dense_onnx), *args])
    assert res.exit_code == code, res.output
    assert words in res.output and "Traceback" not in res.output


def test_bench_needs_both_idle_and_dense(tiny_idle_onnx, tmp_path):
    res = CliRunner().invoke(app, ["bench", str(tiny_idle_onnx)])
    assert res.exit_code == 2 and "dense" in res.output
    res = CliRunner().invoke(app, ["bench", str(tmp_path / "missing.onnx")])
    assert res.exit_code == 2 and "not found" in res.output


def test_bench_gpu_backends_without_gpu_exit_3(tiny_idle_onnx, tiny_dense_onnx):
    from idle_export.hardware import gpu_info
    from idle_export.runtime.onnxruntime import ort_available_providers

    if gpu_info() is not None:
        pytest.skip("a GPU is present: the no-GPU error path cannot be exercised")
    res = CliRunner().invoke(app, ["bench", str(tiny_idle_onnx), str(tiny_dense_onnx), "--backend", "trt"])
    assert res.exit_code == 3 and "needs a GPU" in res.output
    if "CUDAExecutionProvider" not in ort_available_providers():
        res = CliRunner().invoke(app, ["bench", str(tiny_idle_onnx), str(tiny_dense_onnx),
                                       "--backend", "ort-cuda"])
        assert res.exit_code == 3 and "CUDAExecutionProvider" in res.output


# ----------------------------------------------------------------------------- ORT passes
@pytest.mark.parametrize("passes", [None, ("fold_initializer_ops", "fuse_transformer_ops", "gather_rows",
                                             "linear_to_gemm")])
def test_optimize_passes_rewrite_graph_and_keep_parity(tiny_ckpt, tiny_idle_onnx, tiny_dense_onnx,
                                                       tmp_path, passes):
    import onnx

    from idle_export.data.inputs import builtin_photos, seeded_noise
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.model.config import TOLERANCES
    from idle_export.model.vit import build_model
    from idle_export.onnx.passes import DEFAULT_PASSES, optimize_model_proto
    from idle_export.parity.compare import compare_runners
    from idle_export.runtime.onnxruntime import OrtRunner
    from idle_export.runtime.torch import TorchRunner

    passes = passes or DEFAULT_PASSES
    ckpt = load_checkpoint(tiny_ckpt)
    spec = ckpt.spec()
    inputs = {"noise": seeded_noise(7, spec), "photos": builtin_photos(7, spec)}
    for path, dense in ((tiny_idle_onnx, False), (tiny_dense_onnx, True)):
        before = onnx.load(str(path))
        after = optimize_model_proto(before, passes)
        ops = [n.op_type for n in after.graph.node]
        meta = {p.key: p.value for p in after.metadata_props}
        assert json.loads(meta["idle_export.optimized"]) == list(passes) and "idle_export.arch" in meta
        if not dense:  # token gathers/scatters became row copies; weight slices left the graph
            assert "GatherElements" not in ops and "ScatterElements" not in ops
            assert ops.count("GatherND") == 3 * len(spec.idle_layers)
            assert ops.count("ScatterND") == len(spec.idle_layers)
            assert ops.count("Slice") < [n.op_type for n in before.graph.node].count("Slice")
        if "bias_gelu" in passes or "fuse_transformer_ops" in passes:  # one per MLP, no Erf left
            assert ops.count("BiasGelu") == spec.depth and "Erf" not in ops
        if "fuse_transformer_ops" in passes:
            assert "SkipLayerNormalization" in ops
        if "linear_to_gemm" in passes:
            assert ops.count("Gemm") > spec.depth  # qkv at least (other biases may sit in fusions)
        out = tmp_path / f"{path.stem}.opt.onnx"
        onnx.save(after, str(out))
        ref = TorchRunner(build_model(spec, ckpt.state_dict, dense=dense), selection=not dense)
        rep = compare_runners(OrtRunner(out, selection=not dense), ref, inputs, [1, 7], TOLERANCES["fp32"])
        assert rep["passed"], rep["cases"]


@pytest.mark.parametrize("mode", ["official", "folded"])
def test_optimized_parity_on_trained_model(photos10_ckpt, photos10_idle_onnx, tmp_path, mode):
    from idle_export.data.inputs import builtin_photos, seeded_noise
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.model.config import TOLERANCES
    from idle_export.model.vit import build_model
    from idle_export.onnx.export import export_checkpoint
    from idle_export.parity.compare import compare_runners
    from idle_export.runtime.onnxruntime import OrtRunner
    from idle_export.runtime.torch import TorchRunner

    ckpt = load_checkpoint(photos10_ckpt)
    spec = ckpt.spec()
    path = photos10_idle_onnx if mode == "official" else export_checkpoint(
        ckpt, spec, tmp_path / "folded.onnx", score_mode="folded")
    inputs = {"noise": seeded_noise(16, spec), "photos": builtin_photos(16, spec)}
    ref = TorchRunner(build_model(spec, ckpt.state_dict, score_mode=mode), selection=True)
    rep = compare_runners(OrtRunner(path, selection=True, optimize=True), ref, inputs, [1, 16],
                          TOLERANCES["fp32"])
    assert rep["passed"], rep["cases"]
    assert all(c["selection"] == 1.0 and c["top1"] == 1.0 for c in rep["cases"])


def test_folded_scores_select_the_same_tokens_on_real_images(photos10_ckpt):
    """The folded ranking xn·(Wkᵀq) keeps exactly the official top-K on the trained model."""
    from idle_export.data.inputs import builtin_photos
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.model.config import TOLERANCES
    from idle_export.model.vit import build_model
    from idle_export.parity.compare import compare_runners
    from idle_export.runtime.torch import TorchRunner

    ckpt = load_checkpoint(photos10_ckpt)
    spec = ckpt.spec()
    folded = TorchRunner(build_model(spec, ckpt.state_dict, score_mode="folded"), selection=True)
    official = TorchRunner(build_model(spec, ckpt.state_dict), selection=True)
    rep = compare_runners(folded, official, {"photos": builtin_photos(40, spec, seed=3)}, [40],
                          TOLERANCES["fp32"])
    case = rep["cases"][0]
    assert case["selection"] == 1.0 and case["top1"] == 1.0 and case["max_abs"] < 1e-4


# ----------------------------------------------------------------------------- official code
@pytest.fixture(scope="module")
def official_repo(tmp_path_factory) -> Path:
    if not MIRROR.is_dir() or not shutil.which("git"):
        pytest.skip(f"no mirror of Ackesnal/IdleViT at {MIRROR}")
    dest = tmp_path_factory.mktemp("IdleViT")
    archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "HEAD"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def test_official_code_backend_matches_our_model(tiny_ckpt, official_repo):
    import sys

    from idle_export.data.inputs import builtin_photos
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.model.vit import build_model
    from idle_export.runtime.official import OfficialRunner, build_official_model
    from idle_export.runtime.torch import TorchRunner

    ckpt = load_checkpoint(tiny_ckpt)
    spec = ckpt.spec()
    x = {"images": builtin_photos(3, spec)}
    modules_before = set(sys.modules)
    with OfficialRunner(build_official_model(official_repo, spec, ckpt.state_dict)) as r:
        theirs = r.infer(x)["logits"]
    assert "utils" not in set(sys.modules) - modules_before  # their utils.py is not left behind
    with TorchRunner(build_model(spec, ckpt.state_dict)) as r:
        ours = r.infer(x)["logits"]
    assert np.abs(theirs - ours).max() < 1e-4


def test_bench_torch_official_backend(tiny_ckpt, tiny_idle_onnx, tiny_dense_onnx, official_repo):
    from idle_export.bench.run import run_bench

    report = run_bench([tiny_ckpt, tiny_idle_onnx, tiny_dense_onnx], backends=["torch-official", "ort"],
                       batches=[1], threads=1, official_repo=official_repo, score_modes=["official"],
                       **FAST)
    pairs = {(c["backend"], c["variant"], c["baseline"]) for c in report["comparisons"]}
    assert ("ort", "idle", "torch-official:official") in pairs
    assert ("ort", "idle", "ort:dense") in pairs


def test_official_repo_errors(tiny_ckpt, tmp_path):
    res = CliRunner().invoke(app, ["bench", str(tiny_ckpt), "--backend", "torch-official"])
    assert res.exit_code == 2 and "--official-repo" in res.output
    res = CliRunner().invoke(app, ["bench", str(tiny_ckpt), "--backend", "torch-official",
                                   "--official-repo", str(tmp_path)])
    assert res.exit_code == 2 and "vit.py" in res.output


@pytest.mark.trt
def test_bench_engine_targets(tiny_idle_onnx, tiny_dense_onnx, tmp_path):
    """Engines are paired by their sidecar's metadata; without a GPU the trt backend exits 3."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX builder not installed")
    from idle_export.bench.targets import resolve_targets
    from idle_export.hardware import gpu_info
    from idle_export.trt.build import build_engine

    engines = []
    for path in (tiny_idle_onnx, tiny_dense_onnx):
        out = tmp_path / f"{path.stem}.engine"
        build_engine(path, precision="fp32", batch=(1, 1, 2), output=out)
        engines.append(out)
    targets = resolve_targets(engines, backends=["trt"], score_modes=["official"], workdir=tmp_path)
    assert [(p.name, d, m) for p, d, m in targets.engines] == [
        ("tiny_idle.engine", False, "official"), ("tiny_dense.engine", True, "official")]
    assert targets.spec.arch == "deit_tiny"
    if gpu_info() is None:
        res = CliRunner().invoke(app, ["bench", *map(str, engines), "--backend", "trt"])
        assert res.exit_code == 3 and "needs a GPU" in res.output


def test_bench_two_files_with_the_same_role_stay_apart(tiny_idle_onnx, tiny_dense_onnx, tmp_path):
    from idle_export.bench.run import run_bench

    twin = tmp_path / "tiny_idle_copy.onnx"
    shutil.copy(tiny_idle_onnx, twin)
    report = run_bench([tiny_idle_onnx, twin, tiny_dense_onnx], backends=["ort"], batches=[1], threads=1,
                       optimize=False, **FAST)
    assert [r["variant"] for r in report["results"]] == ["idle", "idle(tiny_idle_copy)", "dense"]
    assert report["settings"]["optimize"] is False and report["settings"]["passes"] == {}
    assert all(r["passes_at_load"] == [] for r in report["results"])  # timed as written
    assert all(r["calls"] == 2 * r["iters_per_run"] for r in report["results"])
    assert {c["variant"] for c in report["comparisons"]} == {"idle", "idle(tiny_idle_copy)"}
