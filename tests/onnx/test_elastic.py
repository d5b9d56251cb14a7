"""The elastic form (onnx.elastic, model.elastic_k): K from a keep_rate input, exact on the grid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from idle_export.model.config import ModelSpec, schedule_k
from idle_export.model.elastic_k import elastic_k, k_from_thresholds, min_valid_rate, thresholds
from idle_export.model.families import DEIT, LVVIT
from idle_export.onnx.elastic import KEEP_RATE_INPUT, k_model, k_subgraph
from idle_export.onnx.metadata import OnnxMetadata
from tests.conftest import error_lines


def _session(proto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _k_session(exponents, n=196):
    from onnx import helper

    nodes, inits, k_of = k_subgraph(n, exponents)
    rate = helper.make_tensor_value_info(KEEP_RATE_INPUT, onnx.TensorProto.FLOAT, [])
    graph = helper.make_graph(nodes, "k", [rate],
                              [helper.make_tensor_value_info(k_of[p], onnx.TensorProto.INT64, [1])
                               for p in sorted(k_of)], initializer=inits)
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])), k_of


@pytest.mark.parametrize("exponents", [DEIT.schedules["eval"][1], DEIT.schedules["train"][1],
                                       LVVIT.archs["lvvit_s"]["exponents"],
                                       LVVIT.archs["lvvit_m"]["exponents"]],
                         ids=["deit_eval", "deit_train", "lvvit_s", "lvvit_m"])
def test_graph_k_equals_the_python_schedule_on_the_whole_grid(exponents):
    """Every rate on the 0.01 grid from the smallest valid one to 1.0, fed as float32, run by
    ONNX Runtime: the graph's K per idle layer is int(196 * r**p) in Python floats."""
    session, k_of = _k_session(exponents)
    start = round(min_valid_rate(196, exponents) * 100)
    assert start == 18  # 196·0.17³ < 1 ≤ 196·0.18³
    grid = [i / 100 for i in range(start, 101)]
    names = [k_of[p] for p in exponents]
    for r in grid:
        got = session.run(names, {KEEP_RATE_INPUT: np.asarray(r, dtype=np.float32)})
        assert tuple(int(k[0]) for k in got) == schedule_k(196, r, exponents), r


def test_out_of_range_rates_clamp_k_to_one_and_n():
    session, k_of = _k_session((1, 2, 3))
    names = [k_of[p] for p in (1, 2, 3)]
    cases = {0.0: [1, 1, 1], -1.0: [1, 1, 1], float("nan"): [1, 1, 1], float("-inf"): [1, 1, 1],
             0.1: [19, 1, 1], 0.17: [33, 5, 1], 1.0: [196] * 3, 1.5: [196] * 3, float("inf"): [196] * 3}
    for r, want in cases.items():
        got = [int(k[0]) for k in session.run(names, {KEEP_RATE_INPUT: np.asarray(r, dtype=np.float32)})]
        assert got == want, r


def test_thresholds_reproduce_the_decimal_rule_for_any_float32():
    """Off the grid too: the table's count equals the rule at the shortest decimal of x."""
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.random(2000, dtype=np.float32),
                         np.nextafter(thresholds(196, 2), np.float32(0))])  # just below each step
    for p in (1, 2, 3):
        table = thresholds(196, p)
        assert np.all(np.diff(table) >= 0)
        for x in xs:
            assert k_from_thresholds(table, x) == elastic_k(196, x, p), (p, x)


def test_the_elastic_export_has_an_optional_keep_rate(tiny_elastic_onnx, tiny_folded_onnx):
    proto = onnx.load(tiny_elastic_onnx)
    meta = OnnxMetadata.of(proto)
    assert meta.elastic["default"] == 0.7 and meta.elastic["min_rate"] == 0.18
    assert meta.elastic["exponents"] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert meta.spec.keep_k == (137, 137, 137, 96, 96, 96, 67, 67, 67)
    assert [i.name for i in proto.graph.input] == ["images", KEEP_RATE_INPUT]
    default = next(t for t in proto.graph.initializer if t.name == KEEP_RATE_INPUT)
    assert onnx.numpy_helper.to_array(default) == np.float32(0.7)
    ks = _session(k_model(proto)).run(None, {KEEP_RATE_INPUT: np.asarray(0.5, np.float32)})
    assert sorted(int(k[0]) for k in ks) == [24, 49, 98]
    fixed = onnx.load(tiny_folded_onnx)
    assert [i.name for i in fixed.graph.input] == ["images"] and OnnxMetadata.of(fixed).elastic is None


def test_elastic_matches_the_fixed_export_at_its_rate_and_dense_at_one(tiny_elastic_onnx, tiny_folded_onnx,
                                                                      tiny_dense_onnx):
    from idle_export.data.inputs import input_set
    from idle_export.runtime.onnxruntime import OrtRunner

    meta = OnnxMetadata.read(tiny_elastic_onnx)
    x = np.concatenate([input_set("noise", 4, meta.spec), input_set("photos", 4, meta.spec)])
    with OrtRunner(tiny_folded_onnx, selection=True) as fixed, \
            OrtRunner(tiny_elastic_onnx, selection=True) as default, \
            OrtRunner(tiny_elastic_onnx, selection=True, keep_rate=0.7) as fed:
        want = fixed.infer({"images": x})
        for got in (default.infer({"images": x}), fed.infer({"images": x})):
            assert np.abs(got["logits"] - want["logits"]).max() <= 1e-6
            for key in want:
                if key != "logits":
                    assert np.array_equal(np.sort(got[key], 1), np.sort(want[key], 1)), key
    with OrtRunner(tiny_dense_onnx) as dense, OrtRunner(tiny_elastic_onnx, keep_rate=1.0) as full:
        diff = full.infer({"images": x})["logits"] - dense.infer({"images": x})["logits"]
        assert np.abs(diff).max() <= 1e-4


def test_elastic_at_other_rates_matches_torch_at_that_rate(tiny_ckpt, tiny_elastic_onnx):
    import torch

    from idle_export.data.inputs import input_set
    from idle_export.model.build import build_model
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.runtime.onnxruntime import OrtRunner

    ckpt = load_checkpoint(tiny_ckpt)
    spec = OnnxMetadata.read(tiny_elastic_onnx).spec
    x = input_set("photos", 3, spec)
    for rate in (0.18, 0.5, 0.93):
        model = build_model(spec.at_rate(rate), ckpt.state_dict, score_mode="official")
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        with OrtRunner(tiny_elastic_onnx, keep_rate=rate) as runner:
            assert np.abs(runner.infer({"images": x})["logits"] - want).max() <= 1e-4, rate


@pytest.mark.parametrize("args, problem", [
    (["--dense"], "dense baseline has none"),
    (["--keep-k", "100,90,80,70,60,50,40,30,20"], "explicit --keep-k"),
    (["--plugin"], "plugin form"),
    (["--keep", "0.673956282901362"], "not a float32 rate"),
])
def test_elastic_refuses_what_it_cannot_vary(tiny_ckpt, tmp_path, args, problem):
    from typer.testing import CliRunner

    from idle_export.cli import app

    out = tmp_path / "x.onnx"
    result = CliRunner().invoke(app, ["onnx", str(tiny_ckpt), "--elastic", "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], result.stderr
    assert "(hint: " in lines[0] and not list(tmp_path.iterdir())


def test_spec_at_rate_uses_the_schedule():
    spec = ModelSpec.create("lvvit_m", 0.7)
    assert spec.at_rate(0.5).keep_k == schedule_k(196, 0.5, LVVIT.archs["lvvit_m"]["exponents"])
    assert ModelSpec.create("deit_small", 0.7, keep_k=[1] * 9).follows_schedule is False


def test_elastic_target_file_runs_at_any_rate_on_both_runtimes(tiny_ckpt, tiny_elastic_onnx, tmp_path):
    """--elastic --target openvino (row gathers on the elastic graph): OpenVINO and ONNX Runtime
    at two rates agree with the portable elastic file."""
    from idle_export.data.inputs import input_set
    from idle_export.runtime.onnxruntime import OrtRunner
    from idle_export.runtime.openvino import OpenVinoRunner
    from tests.conftest import _export

    path = _export(tiny_ckpt, tmp_path / "e.openvino.onnx", elastic=True, target="openvino")
    assert OnnxMetadata.read(path).elastic is not None
    x = input_set("photos", 3, OnnxMetadata.read(path).spec)
    for rate in (0.35, 0.8):
        with OrtRunner(tiny_elastic_onnx, keep_rate=rate, selection=True) as ref:
            want = ref.infer({"images": x})
        for cls in (OrtRunner, OpenVinoRunner):
            with cls(path, keep_rate=rate, selection=True) as run:
                got = run.infer({"images": x})
            assert np.abs(got["logits"] - want["logits"]).max() <= 1e-4, (cls, rate)
            assert np.array_equal(np.sort(got["selection_layer11"], 1), np.sort(want["selection_layer11"], 1))


def test_pin_rate_fixes_k_as_constants(tiny_elastic_onnx):
    """OpenVinoRunner's per-rate graph: no keep_rate input, K constant, the elastic answers."""
    from idle_export.data.inputs import input_set
    from idle_export.onnx.elastic import pin_rate

    proto = onnx.load(tiny_elastic_onnx)
    pinned = pin_rate(proto, 0.45)
    assert [i.name for i in pinned.graph.input] == ["images"]
    assert not [n for n in pinned.graph.node if n.name.startswith("elastic_k_p")]
    x = input_set("photos", 2, OnnxMetadata.of(proto).spec)
    want = _session(proto).run(["logits"], {"images": x, KEEP_RATE_INPUT: np.asarray(0.45, np.float32)})[0]
    assert np.array_equal(_session(pinned).run(["logits"], {"images": x})[0], want)
