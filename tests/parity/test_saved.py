"""Runs saved and compared later (`check --save-outputs` / `--load-outputs`): the file is
Polygraphy's RunResults JSON; a replayed run answers only the inputs it was made on."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from tests.conftest import error_lines

runner = CliRunner()
pytest.importorskip("polygraphy")


@pytest.fixture(scope="module")
def saved(tiny_ckpt, tiny_folded_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "run.json"
    result = runner.invoke(app, ["check", str(tiny_folded_onnx), "--ckpt", str(tiny_ckpt), "--inputs",
                                 "noise,photos", "--batch", "1,5", "--save-outputs", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_the_saved_run_is_polygraphy_run_results(saved, tiny_folded_onnx):
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(saved))
    names = [name for name, _ in results.items()]
    assert names[0].startswith("onnxruntime") or tiny_folded_onnx.name in names[0]
    assert names[1].startswith("torch:")
    for _, iterations in results.items():
        assert [it["logits"].shape for it in iterations] == [(1, 1000), (5, 1000), (1, 1000), (5, 1000)]
        assert all(any(k.startswith("selection_layer") for k in it) for it in iterations)
    ours = json.loads(saved.read_text())["idle_export"]
    assert ours["check"] == {"inputs": ["noise", "photos"], "batch": [1, 5], "seed": 0, "images": None,
                             "num": 0}
    assert len(ours["inputs_sha256"][names[0]]) == 4 and ours["machine"]["cpu"]


def test_a_later_check_compares_against_the_saved_run(saved, tiny_folded_onnx, tmp_path):
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["check", str(tiny_folded_onnx), "--load-outputs", str(saved), "--inputs",
                                 "noise,photos", "--batch", "1,5", "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert "saved in run.json" in data["b"]
    assert all(c["max_abs"] == 0.0 and c["selection_raw"] == 1.0 for c in data["cases"])  # same ORT run


def test_another_model_against_the_saved_run_fails(saved, tiny_dense_onnx):
    result = runner.invoke(app, ["check", str(tiny_dense_onnx), "--load-outputs", str(saved), "--inputs",
                                 "noise", "--batch", "1"])
    assert result.exit_code == 1, result.output


@pytest.mark.parametrize("args, words", [
    (["--seed", "5"], "has no outputs for these inputs"),
    (["--batch", "3"], "has no outputs for these inputs"),
])
def test_other_inputs_than_the_saved_ones_are_refused(saved, tiny_folded_onnx, args, words):
    result = runner.invoke(app, ["check", str(tiny_folded_onnx), "--load-outputs", str(saved), "--inputs",
                                 "noise", *(["--batch", "1"] if "--batch" not in args else []), *args])
    lines = error_lines(result.stderr)
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and words in lines[0] and "--seed" in lines[0], lines


def test_a_file_that_is_not_a_saved_run(tiny_folded_onnx, tmp_path):
    (tmp_path / "x.json").write_text('{"lst": []}')
    result = runner.invoke(app, ["check", str(tiny_folded_onnx), "--load-outputs", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "is not a run saved by" in result.stderr, result.output
