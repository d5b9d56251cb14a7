"""`idle-export trt`: real TensorRT-RTX builds on CPU (cross-built for one SM), sidecars, the
runner's refusals, and every bad input the issue lists. Running engines needs a GPU (marked)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.hardware import gpu_info
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.runtime.tensorrt import TrtRunner
from idle_export.trt.flavour import import_trt, parse_target
from idle_export.trt.inputs import parse_profile
from idle_export.trt.sidecar import compatibility_problems, inspect_engine

runner = CliRunner()
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_TRT = HAS_RTX or importlib.util.find_spec("tensorrt") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed "
                               "(pip install tensorrt-rtx-cu13==1.7.1.116)")
TARGET = "sm89"
BATCH = "1:4:8"


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tiny_idle_onnx, tiny_dense_onnx, tmp_path_factory):
    """Idle and dense FP16 engines for one SM target, built once for the module."""
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13==1.7.1.116)")
    d = tmp_path_factory.mktemp("engines")
    out = {}
    for name, onnx_path in (("idle", tiny_idle_onnx), ("dense", tiny_dense_onnx)):
        engine = d / f"{name}.engine"
        result = run_cli("trt", onnx_path, "--fp16", "--profile", BATCH, "--target", TARGET,
                         "--flavour", "tensorrt_rtx", "-o", engine, "--json", d / f"{name}.json")
        assert result.exit_code == 0, result.output
        out[name] = (engine, result.output)
    return out


@pytest.mark.trt
@needs_rtx
@pytest.mark.parametrize("name", ["idle", "dense"])
def test_rtx_builds_fp16_engines_with_sidecar(built, name, tiny_idle_onnx, tiny_dense_onnx):
    from idle_export.fileio import sha256_file as file_sha256
    from idle_export.onnx.fp16 import precision_summary
    from idle_export.onnx.io import load_onnx as load

    engine, output = built[name]
    assert engine.stat().st_size > 1_000_000
    side = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert side["flavour"] == "tensorrt_rtx" and side["trt_version"].startswith("1.")
    assert side["precision"] == "fp16" and side["strongly_typed"] and side["compute_capability"] == TARGET
    assert side["profiles"][0]["min"] == [1, 3, 224, 224] and side["profiles"][0]["max"][0] == 8
    src = tiny_idle_onnx if name == "idle" else tiny_dense_onnx
    assert side["onnx"]["sha256"] == file_sha256(src)
    assert side["io"][-1]["name"] == "logits" and side["io"][-1]["dtype"] == "float"
    assert json.loads(side["model"]["idle_export.dense"]) is (name == "dense")
    # the graph it was built from: the FP16 surgery output, scores/TopK FP32
    fp16 = engine.with_name(f"{name}.fp16.onnx")
    assert side["built_from"]["path"] == fp16.name and fp16.is_file()
    summary = precision_summary(load(fp16))
    assert set(summary["topk_inputs"]) <= {"float"}
    assert len(summary["topk_inputs"]) == (9 if name == "idle" else 0)
    assert "using TensorRT-RTX" in output and "equivalent: tensorrt_rtx --onnx=" in output
    assert "--maxShapes=images:8x3x224x224" in output
    # what can be checked without a GPU: sidecar ↔ engine bytes, RTX header and builder version
    info = inspect_engine(engine)
    assert info["checks"][0] == "sidecar matches engine sha256" and "TensorRT-RTX header" in info["checks"][1]


@pytest.mark.trt
@needs_rtx
def test_rtx_builds_int8_from_a_qdq_onnx(tiny_idle_onnx, tmp_path):
    """Symmetric INT8 Q/DQ (ONNX Runtime quantize_static, no bias quantization) → INT8 engine."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from idle_export.data.inputs import builtin_photos
    from idle_export.onnx.metadata import OnnxMetadata

    spec = OnnxMetadata.read(tiny_idle_onnx).spec
    batches = iter([{"images": builtin_photos(2, spec, seed=s)} for s in range(2)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    qdq = tmp_path / "tiny_idle.qdq.onnx"
    quantize_static(str(tiny_idle_onnx), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    extra_options={"QuantizeBias": False, "ActivationSymmetric": True,
                                   "WeightSymmetric": True})
    assert run_cli("lint", qdq, "--expect-idle").exit_code == 0
    engine = tmp_path / "int8.engine"
    result = run_cli("trt", qdq, "--int8", "--profile", "1:2:4", "--target", TARGET,
                     "--flavour", "tensorrt_rtx", "--emit-selection", "-o", engine)
    assert result.exit_code == 0, result.output
    side = inspect_engine(engine)
    assert side["precision"] == "int8" and side["built_from"] is None and side["engine_bytes"] > 1_000_000
    # --emit-selection: the kept token indices of each idle layer are engine outputs too
    assert side["selection_outputs"] == [f"selection_layer{i}" for i in range(3, 12)]
    sel = {t["name"]: t for t in side["io"] if t["name"].startswith("selection_layer")}
    assert sel["selection_layer3"]["shape"] == [-1, 137] and sel["selection_layer11"]["shape"] == [-1, 67]


@pytest.mark.trt
@needs_rtx
def test_int8_with_calib_folder_uses_the_quantizer(tiny_idle_onnx, tmp_path):
    pytest.importorskip("idle_export.quantize", reason="idle_export.quantize (issue 5) is not in this build")
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    engine = tmp_path / "calib.engine"
    result = run_cli("trt", tiny_idle_onnx, "--int8", "--calib", calib, "--calib-num", 4,
                     "--profile", "1:2:4", "--target", TARGET, "--flavour", "tensorrt_rtx", "-o", engine)
    assert result.exit_code == 0, result.output
    qdq = tmp_path / "tiny_idle.int8.trt.onnx"  # the name `calibrate --target trt` gives, beside the engine
    assert qdq.is_file() and inspect_engine(engine)["precision"] == "int8"
    assert OnnxMetadata.read(qdq).get("quantization")["target"] == "trt"


@pytest.mark.trt
@needs_rtx
def test_runner_refuses_engines_this_runtime_cannot_run(built, tmp_path, monkeypatch):
    import idle_export.runtime.tensorrt as runner_mod
    from idle_export.trt.flavour import TrtInfo, import_trt

    engine, _ = built["idle"]
    copy = tmp_path / engine.name
    shutil.copy(engine, copy)
    shutil.copy(engine.with_name(engine.name + ".json"), tmp_path)
    side = copy.with_name(copy.name + ".json")
    meta = json.loads(side.read_text())
    # the runtime is another TensorRT version: refused before any GPU is needed
    real = import_trt("tensorrt_rtx")
    newer = TrtInfo(real.module, "tensorrt_rtx", "9.9.0.1")
    with monkeypatch.context() as m:
        m.setattr(runner_mod, "import_trt", lambda flavour=None: newer)
        with pytest.raises(BadInputError, match=rf"built with TensorRT-RTX {meta['trt_version']}; "
                           r"this runtime is TensorRT-RTX 9\.9\.0\.1"):
            TrtRunner(copy).activate()
    # a sidecar edited to claim another version: the engine header says otherwise
    side.write_text(json.dumps({**meta, "trt_version": "1.0.0.1"}))
    with pytest.raises(BadInputError, match=r"header says TensorRT-RTX 1\.\d+\.\d+, sidecar says 1\.0\.0\.1"):
        TrtRunner(copy).activate()
    # engine bytes replaced after the build
    side.write_text(json.dumps({**meta, "engine_sha256": "0" * 64}))
    with pytest.raises(BadInputError, match="does not match its sidecar"):
        TrtRunner(copy).activate()
    side.unlink()
    with pytest.raises(BadInputError, match="has no sidecar"):
        TrtRunner(copy).activate()


def test_compatibility_rules_for_gpu_and_version():
    side = {"flavour": "tensorrt_rtx", "trt_version": "1.7.1.116", "compute_capability": "sm89"}
    assert compatibility_problems(side, None, "sm89") == []
    assert compatibility_problems(side, None, "sm90") == ["engine was built for sm89; this GPU is sm90"]
    portable = {**side, "compute_capability": "portable"}
    assert compatibility_problems(portable, None, "sm86") == []
    assert "RTX-class GPUs" in compatibility_problems(portable, None, "sm75")[0]
    assert "this GPU is sm90" in compatibility_problems(portable, None, "sm90")[0]  # Hopper: TensorRT


@pytest.mark.trt
@needs_rtx
def test_without_gpu_the_runner_says_it_needs_one(built):
    if gpu_info() is not None:
        pytest.skip("this machine has a GPU")
    with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU"):
        TrtRunner(built["idle"][0]).activate()


def test_bad_batch_ranges_and_targets():
    assert parse_profile("1:32:64") == (1, 32, 64) and parse_profile("8:8:8") == (8, 8, 8)
    with pytest.raises(BadInputError, match="static engine for batch 8 is batch=8:8:8"):
        parse_profile("8")  # one number used to make a static engine without a word
    with pytest.raises(BadInputError, match="inverted"):
        parse_profile("64:32:1")
    with pytest.raises(BadInputError, match="MIN:OPT:MAX"):
        parse_profile("a:b")
    with pytest.raises(BadInputError, match="above 4096"):
        parse_profile("1:32:100000000")
    # trtexec's spelling gives the same profile; only the batch may differ from the model's input
    shapes = ("images:1x3x224x224", "images:32x3x224x224", "images:64x3x224x224")
    assert parse_profile(shapes=shapes, chw=(3, 224, 224)) == (1, 32, 64)
    with pytest.raises(BadInputError, match="takes 3x224x224 images"):
        parse_profile(shapes=(*shapes[:2], "images:64x3x256x256"), chw=(3, 224, 224))
    assert parse_target("sm89") == "sm89" and parse_target("8.6") == "sm86" and parse_target("120") == "sm120"
    with pytest.raises(BadInputError, match="not a compute capability"):
        parse_target("ampere")


@pytest.mark.parametrize("args,message", [
    (["--profile", "64:32:1"], "inverted"),
    (["--profile", "8"], "--profile 8:8:8"),
    (["--batch", "1:32:64"], "--profile MIN:OPT:MAX"),
    (["--minShapes", "images:1x3x224x224"], "together"),
    (["--fp16", "--int8"], "choose one precision"),
    (["--fp16", "--calib", "."], "--calib is for INT8"),
])
def test_cli_bad_input_exits_2_without_output(tiny_idle_onnx, tmp_path, args, message):
    engine = tmp_path / "x.engine"
    result = run_cli("trt", tiny_idle_onnx, *args, "-o", engine)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not engine.exists() and not list(tmp_path.iterdir())


def test_cli_not_an_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    result = run_cli("trt", bad, "--fp16", "-o", tmp_path / "m.engine")
    assert result.exit_code == 2 and "is not an ONNX model" in result.output
    assert not (tmp_path / "m.engine").exists()


@needs_rtx
def test_cli_unknown_target_for_rtx(tiny_idle_onnx, tmp_path):
    result = run_cli("trt", tiny_idle_onnx, "--target", "sm70", "--flavour", "tensorrt_rtx",
                     "-o", tmp_path / "x.engine")
    assert result.exit_code == 2 and "cannot build for sm70" in result.output


def test_no_tensorrt_installed_exits_3_with_the_pip_command(tiny_idle_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.delenv("IDLE_EXPORT_TRT", raising=False)
    with pytest.raises(MissingDependencyError):
        import_trt()
    result = run_cli("trt", tiny_idle_onnx, "--fp16", "-o", tmp_path / "x.engine")
    assert result.exit_code == 3, result.output
    assert "no TensorRT found" in result.output and "pip install tensorrt-rtx-cu13" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.trt
def test_engine_runs_and_matches_onnxruntime_on_gpu(tiny_idle_onnx, tmp_path):
    """On a GPU: build with whatever TensorRT is installed, run it, compare with ORT FP32."""
    if not HAS_TRT:
        pytest.skip("no TensorRT installed")
    if gpu_info() is None:
        pytest.skip("no NVIDIA GPU on this machine")
    from idle_export.parity.check import check_engine_against
    from idle_export.trt.build import build_engine

    for precision in ("fp32", "fp16"):
        engine = tmp_path / f"{precision}.engine"
        build_engine(tiny_idle_onnx, precision=precision, batch=(1, 4, 8), output=engine)
        report = check_engine_against(engine, tiny_idle_onnx, batch_sizes=[1, 8])
        assert all(c["top1"] >= 0.99 for c in report["cases"]), report
        if precision == "fp32":
            assert report["passed"], report
