"""The public Python API (idle_export.api, docs/api.md): light to import, the same results as the
commands (they call the same library functions), the CLI's errors as exceptions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export import api
from idle_export.cli import app
from idle_export.errors import BadInputError, CheckpointError
from idle_export.onnx.io import load_onnx, onnx_summary
from idle_export.onnx.metadata import OnnxMetadata

HEAVY = ("torch", "onnx", "onnxruntime", "timm", "tensorrt", "tensorrt_rtx", "matplotlib", "triton")


def test_import_loads_no_heavy_library():
    code = ("import sys, idle_export; print(sorted(n for n in vars(idle_export) if not n.startswith('_'))); "
            f"import idle_export.api; heavy = {HEAVY!r}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    public, heavy = out.stdout.splitlines()
    assert public == "[]", public  # the package itself holds only __version__
    assert heavy == "[]", heavy
    for name in api.__all__:  # typed, documented
        obj = getattr(api, name)
        assert obj.__doc__ and obj.__doc__.strip(), name
        if callable(obj) and not isinstance(obj, type):
            assert "return" in obj.__annotations__, f"{name} has no return annotation"


def test_export_check_lint(tiny_ckpt, tiny_dense_onnx, tmp_path):
    ckpt = api.load_checkpoint(tiny_ckpt)
    spec = api.model_spec(ckpt, keep=0.5)
    out = api.export_onnx(ckpt, tmp_path / "idle.onnx", keep=0.5)
    assert out == tmp_path / "idle.onnx"
    meta = OnnxMetadata.of(load_onnx(out))
    assert list(meta.spec.keep_k) == list(spec.keep_k) and spec.keep_k[0] == 98  # 196 patches × 0.5
    report = api.check(out, ckpt=tiny_ckpt, batch_sizes=(1, 3), inputs=("noise",))  # a path works too
    assert report["passed"] and len(report["cases"]) == 2 and "keep 0.5" in report["model"]
    assert api.lint(out, expect_idle=True)["passed"]
    lint = api.lint(tiny_dense_onnx, expect_idle=True)
    assert not lint["passed"] and lint["ops"].get("TopK", 0) == 0
    # a failed comparison is a report, not an exception: idle against dense differs
    report = api.check(out, against=tiny_dense_onnx, batch_sizes=(2,), inputs=("noise",))
    assert not report["passed"]


def test_api_and_cli_write_the_same_graph(tiny_ckpt, tmp_path):
    """The CLI is a shell over the same functions: same options, same graph and metadata."""
    result = CliRunner().invoke(app, ["onnx", str(tiny_ckpt), "-o", str(tmp_path / "cli.onnx"),
                                      "--schedule", "train", "--scores", "official"])
    assert result.exit_code == 0, result.output
    api.export_onnx(tiny_ckpt, tmp_path / "api.onnx", schedule="train", scores="official")
    a, b = onnx_summary(tmp_path / "cli.onnx"), onnx_summary(tmp_path / "api.onnx")
    assert a["ops"] == b["ops"] and a["ops"]["TopK"] == 8
    meta_a = OnnxMetadata.of(load_onnx(tmp_path / "cli.onnx")).ours()
    meta_b = OnnxMetadata.of(load_onnx(tmp_path / "api.onnx")).ours()
    assert meta_a == meta_b and meta_a["idle_export.score_mode"] == '"official"'


def test_torch_model_is_what_the_export_runs(tiny_ckpt, tiny_dense_onnx):
    import onnxruntime as ort
    import torch

    from idle_export.data.inputs import seeded_noise

    model = api.torch_model(tiny_ckpt, dense=True)
    x = seeded_noise(2, api.model_spec(tiny_ckpt))
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    theirs = ort.InferenceSession(str(tiny_dense_onnx), providers=["CPUExecutionProvider"]).run(
        None, {"images": x})[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_errors_are_the_clis(tiny_ckpt, tiny_folded_onnx, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        api.export_onnx(tmp_path / "nope.pth", tmp_path / "x.onnx")
    with pytest.raises(BadInputError, match="scores='fast'"):
        api.export_onnx(tiny_ckpt, tmp_path / "x.onnx", scores="fast")
    with pytest.raises(BadInputError, match="keep rate 1.5"):
        api.export_onnx(tiny_ckpt, tmp_path / "x.onnx", keep=1.5)
    with pytest.raises(BadInputError, match="exactly one reference"):
        api.check(tiny_folded_onnx)
    with pytest.raises(BadInputError, match="needs positive sizes"):
        api.check(tiny_folded_onnx, ckpt=tiny_ckpt, batch_sizes=())
    with pytest.raises(BadInputError, match="unknown set"):
        api.check(tiny_folded_onnx, ckpt=tiny_ckpt, inputs=("cats",))
    with pytest.raises(BadInputError, match="TensorRT engine"):
        api.check(tmp_path / "m.engine", ckpt=tiny_ckpt)
    with pytest.raises(BadInputError):
        api.bench([tiny_folded_onnx], backends=("nope",))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bench_and_plot(tiny_folded_onnx, tiny_dense_onnx, tmp_path):
    pytest.importorskip("matplotlib", reason='matplotlib not installed (pip install "idle-export[plot]")')
    report = api.bench([tiny_folded_onnx, tiny_dense_onnx], batches=(1,), runs=1, warmup=1, min_time=0.02,
                       threads=1, plot=tmp_path / "b.png")
    variants = {r["variant"] for r in report["results"]}
    assert "dense" in variants and any(v.startswith("idle") for v in variants), variants
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(report, default=str)  # what --json writes


def test_quantize(tiny_folded_onnx, tmp_path):
    report = api.quantize(tiny_folded_onnx, tmp_path / "int8.onnx", num=4)
    assert report["num_images"] == 4
    assert OnnxMetadata.of(load_onnx(tmp_path / "int8.onnx")).precision == "int8"


@pytest.mark.trt
def test_build_engine_without_gpu(tiny_folded_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason='TensorRT-RTX not installed (pip install "idle-export[trt]")')
    info = api.build_engine(tiny_folded_onnx, tmp_path / "t.engine", precision="fp32", batch=(1, 1, 2),
                            target="sm89", flavour="tensorrt_rtx")
    assert (tmp_path / "t.engine").stat().st_size > 0 and (tmp_path / "t.engine.json").is_file()
    assert info["precision"] == "fp32" and info["compute_capability"] == "sm89"


def test_api_errors_name_parameters_and_the_cli_its_flags(tiny_ckpt, tiny_folded_onnx, tmp_path):
    """One front door: the CLI calls the API; an error names `max_abs=` to an API user and
    `--max-abs` on the command line (cli.app maps the API's names to the command's flags)."""
    from typer.testing import CliRunner

    from idle_export.cli import app

    with pytest.raises(BadInputError, match=r"max_abs=nan must be a finite number"):
        api.check(tiny_folded_onnx, ckpt=tiny_ckpt, max_abs=float("nan"))
    with pytest.raises(BadInputError, match=r"batch_sizes=\[0\] needs positive sizes"):
        api.check(tiny_folded_onnx, ckpt=tiny_ckpt, batch_sizes=[0])
    cases = {("--max-abs", "nan"): "--max-abs nan must be a finite number",
             ("--batch", "0"): "--batch [0] needs positive sizes (hint: e.g. --batch 1,7,32)",
             ("--threads", "0"): "--threads 0 must be between 1 and",
             ("--save-outputs", str(tmp_path / "no" / "r.json")): "output folder"}
    for args, words in cases.items():
        res = CliRunner().invoke(app, ["check", str(tiny_folded_onnx), "--ckpt", str(tiny_ckpt), *args])
        assert res.exit_code == 2 and words in res.output, res.output
        assert "=" not in res.output.split("error: ", 1)[1].split("(hint")[0].replace("==", ""), res.output
