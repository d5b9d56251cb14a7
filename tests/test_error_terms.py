"""One front door (#23 point 4): the library speaks in API terms. An error raised outside
idle_export/cli/ names a parameter as the API spells it (`backend=`, `plugin=True`), and the
command that called the API prints its flag (cli.app.in_flag_terms). A `--flag` in a library
error would be wrong for an API user; the few that must stay are listed here with the reason."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from idle_export import api
from idle_export.cli import app
from idle_export.cli.app import in_flag_terms
from idle_export.errors import BadInputError

ROOT = Path(__file__).resolve().parents[1] / "idle_export"
ERRORS = {"IdleExportError", "BadInputError", "CheckpointError", "MissingDependencyError", "CheckFailedError"}

# Text that names flags correctly in any case: a whole command line to run (`idle-export onnx CKPT
# --elastic`, in backticks or not), a pip command, trtexec's own spelling.
COMMAND_LINES = [r"`[^`]*`", r"idle-export [a-z][^;,()]*", r"pip install[^;,)]*", r"trtexec[^;,)]*"]
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")

# (file, flag): why the flag stays in that file's errors
ALLOWED = {
    ("trt/inputs.py", "--minShapes"): "trtexec's spelling of the three shapes (api.build_engine(shapes=...) "
                                      "takes the same strings)",
    ("trt/inputs.py", "--optShapes"): "as --minShapes",
    ("trt/inputs.py", "--maxShapes"): "as --minShapes",
    ("deps.py", "--upgrade"): "a pip command",
    ("deps.py", "--force-reinstall"): "a pip command",
    ("quantize/qdq.py", "--debug"): "an internal error: rerun the command with --debug (no API parameter)",
}


def _texts(node: ast.AST) -> str:
    """The literal text of a message expression (f-string parts, concatenations, conditionals)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_texts(v) if not isinstance(v, ast.FormattedValue) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _texts(node.left) + _texts(node.right)
    if isinstance(node, ast.IfExp):
        return _texts(node.body) + " | " + _texts(node.orelse)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join":
        return _texts(node.func.value)
    return ""


def _messages(path: Path):
    """(line, text) of every error message and hint in a module: the arguments of an error class
    call, and the strings assigned to a name with "hint" in it."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in ERRORS:
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    yield node.lineno, _texts(arg)
        elif isinstance(node, ast.Assign) and any("hint" in getattr(t, "id", "") for t in node.targets):
            yield node.lineno, _texts(node.value)


def library_flags() -> list[tuple[str, int, str, str]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("cli/"):
            continue
        for line, text in _messages(path):
            for pattern in COMMAND_LINES:
                text = re.sub(pattern, "", text)
            for flag in FLAG.findall(text):
                if (rel, flag) not in ALLOWED:
                    found.append((rel, line, flag, text))
    return found


def test_library_errors_name_api_parameters_not_flags():
    found = library_flags()
    assert not found, "library errors that spell a CLI flag (name the API parameter: `name=`):\n" + "\n".join(
        f"  {rel}:{line}: {flag}  in {text!r}" for rel, line, flag, text in found)


def test_allowed_flags_are_still_used():
    """Each allowed entry still exists (a stale one would hide nothing but mislead)."""
    for rel, flag in ALLOWED:
        assert flag in (ROOT / rel).read_text(), (rel, flag)


def test_in_flag_terms():
    flags = {"keep_range": "--keep-range", "elastic": "--elastic", "batch": "--profile",
             "precision=int8": "--int8", "layers": "--layers", "arch": "--arch", "keep": "--keep"}
    text = "keep_range='0.3' is not MIN:OPT:MAX"
    assert in_flag_terms(text, flags) == "--keep-range '0.3' is not MIN:OPT:MAX"
    assert in_flag_terms("add elastic=True", flags) == "add --elastic"
    assert in_flag_terms("e.g. batch=1:32:64", flags) == "e.g. --profile 1:32:64"
    assert in_flag_terms("pass precision=int8, or build", flags) == "pass --int8, or build"
    assert in_flag_terms("choose layers= among 3,4", flags) == "choose --layers among 3,4"
    assert in_flag_terms("arch=, keep= apply to checkpoints", flags) == "--arch, --keep apply to checkpoints"
    assert in_flag_terms("keep_k=3 and unknown=1", flags) == "keep_k=3 and unknown=1"  # not a flag here


def _cli_error(args: list[str]) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    return res.output.split("error: ", 1)[1]


def test_export_errors_name_parameters_and_the_cli_its_flags(tiny_ckpt, tmp_path):
    with pytest.raises(BadInputError, match=r"scores='x' is not one of .*hint"):
        try:
            api.export_onnx(tiny_ckpt, tmp_path / "a.onnx", scores="x")
        except BadInputError as e:
            raise BadInputError(e.one_line()) from None
    assert "--scores 'x' is not one of" in _cli_error(["onnx", tiny_ckpt, "--scores", "x"])
    with pytest.raises(BadInputError, match=r"target='x' is not one of"):
        api.export_onnx(tiny_ckpt, tmp_path / "a.onnx", target="x")
    assert "--target 'x' is not one of" in _cli_error(["onnx", tiny_ckpt, "--target", "x"])
    with pytest.raises(BadInputError, match=r"plugin=True fuses .* drop plugin=True \(or dense=True\)"):
        try:
            api.export_onnx(tiny_ckpt, tmp_path / "a.onnx", plugin=True, dense=True)
        except BadInputError as e:
            raise BadInputError(e.one_line()) from None
    out = _cli_error(["onnx", tiny_ckpt, "--plugin", "--dense", "-o", tmp_path / "b.onnx"])
    assert "--plugin fuses" in out and "drop --plugin (or --dense)" in out and "=" not in out, out
    assert list(tmp_path.iterdir()) == []


def test_engine_errors_name_parameters_and_the_cli_its_flags(tiny_folded_onnx, tmp_path):
    with pytest.raises(BadInputError, match=r"keep_range= is the profile of an elastic engine"):
        api.build_engine(tiny_folded_onnx, tmp_path / "e.engine", keep_range=(0.3, 0.7, 1), elastic=False)
    out = _cli_error(["trt", tiny_folded_onnx, "--keep-range", "0.3:0.7:1", "-o", tmp_path / "e.engine"])
    assert "--keep-range is the profile of an elastic engine (hint: add --elastic)" in out, out
    with pytest.raises(BadInputError, match=r"batch='1:2' needs three batch sizes.*batch=1:32:64"):
        try:
            api.build_engine(tiny_folded_onnx, tmp_path / "e.engine", batch="1:2")
        except BadInputError as e:
            raise BadInputError(e.one_line()) from None
    out = _cli_error(["trt", tiny_folded_onnx, "--profile", "1:2", "-o", tmp_path / "e.engine"])
    assert "--profile '1:2' needs three batch sizes" in out and "e.g. --profile 1:32:64" in out, out
    with pytest.raises(BadInputError, match=r"calib= is for INT8 builds"):
        api.build_engine(tiny_folded_onnx, calib=tmp_path)
    out = _cli_error(["trt", tiny_folded_onnx, "--calib", tmp_path])
    assert "--calib is for INT8 builds (hint: add --int8, or drop --calib)" in out, out


def test_show_and_sweep_errors_name_parameters_and_the_cli_its_flags(tiny_ckpt, tmp_path):
    with pytest.raises(BadInputError, match=r"max_images=0 must be at least 1"):
        api.show(tiny_ckpt, max_images=0)
    assert "--max-images 0 must be at least 1" in _cli_error(["show", tiny_ckpt, "--max-images", "0",
                                                              "-o", tmp_path / "s.png"])
    with pytest.raises(BadInputError, match=r"output=.*x.jpg is not a .png file"):
        api.show(tiny_ckpt, output=tmp_path / "x.jpg")
    with pytest.raises(BadInputError, match=r"latency_ms=-1 must be > 0"):
        api.sweep(tiny_ckpt, latency_ms=-1, batches=[1])
    assert "--latency-ms -1 must be > 0" in _cli_error(["sweep", tiny_ckpt, "--latency-ms", "-1",
                                                        "--batch", "1"])
    with pytest.raises(BadInputError, match=r"ratios='0.5:x' is not start:stop:step"):
        api.sweep(tiny_ckpt, ratios="0.5:x")
    assert "--ratios '0.5:x' is not start:stop:step" in _cli_error(["sweep", tiny_ckpt, "--ratios", "0.5:x"])


def test_serve_errors_name_parameters_and_the_cli_its_flags(tiny_folded_onnx, tmp_path):
    with pytest.raises(BadInputError, match=r"instances=0 must be at least 1"):
        api.serve_repo(tiny_folded_onnx, tmp_path / "repo", instances=0)
    assert "--instances 0 must be at least 1 (hint: use --instances 1)" in _cli_error(
        ["serve", "repo", tiny_folded_onnx, "-o", tmp_path / "repo", "--instances", "0"])
    with pytest.raises(BadInputError, match=r"top=0 must be at least 1"):
        api.serve_query("http://127.0.0.1:9", [tiny_folded_onnx], top=0)
    assert "--top 0 must be at least 1" in _cli_error(["serve", "query", "http://127.0.0.1:9",
                                                       tiny_folded_onnx, "--top", "0"])


def test_demo_errors_name_parameters_and_the_cli_its_flags(tmp_path):
    with pytest.raises(BadInputError, match=r"batch_sizes=\[0\] needs positive sizes"):
        api.demo(tmp_path / "d", batch_sizes=[0])
    assert "--batch [0] needs positive sizes (hint: e.g. --batch 1,7,32)" in _cli_error(
        ["demo", "-o", tmp_path / "d", "--batch", "0"])
    assert list(tmp_path.iterdir()) == []


def test_serve_bench_errors_name_parameters_and_the_cli_its_flags(tmp_path):
    with pytest.raises(BadInputError, match=r"max_windows=2 must be between 3 and 100"):
        api.serve_bench("http://127.0.0.1:9", ["m"], max_windows=2)
    assert "--max-windows 2 must be between 3 and 100 (hint: e.g. --max-windows 8)" in _cli_error(
        ["serve", "bench", "http://127.0.0.1:9", "--models", "m", "--max-windows", "2"])
    assert "--batch [0] needs positive sizes" in _cli_error(
        ["serve", "bench", "http://127.0.0.1:9", "--models", "m", "--batch", "0"])
    with pytest.raises(BadInputError, match=r"exit_timeout=26 must lie in 0..25"):
        api.serve_run(tmp_path, exit_timeout=26)
