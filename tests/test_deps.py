"""Dependencies as users install them (docs/install.md): ranges with lower bounds in pyproject.toml,
the exact lock in constraints.txt inside those ranges, ONNX Runtime from whichever of onnxruntime /
onnxruntime-gpu is installed, and a missing extra named by the exit-3 error."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from idle_export import api, deps
from idle_export.cli import app
from idle_export.errors import EXIT_MISSING_DEPENDENCY, MissingDependencyError
from tests.conftest import error_lines

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}
ORT = {"onnxruntime", "onnxruntime-gpu"}


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version
    return pins


def _names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


def test_core_dependencies_are_ranges_with_a_lower_bound():
    for req in CORE:
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops, f"{req}: no tested lower bound"
        assert not ops & {"==", "===", "~="}, f"{req}: pinned (the exact versions belong in constraints.txt)"
    numpy = next(r for r in CORE if r.name == "numpy")
    assert numpy.specifier.contains("2.2.6"), "numpy 2 must be allowed (only nvidia-pytriton needs numpy<2)"


def test_onnxruntime_is_an_extra_and_one_flavour_each():
    assert not _names(CORE) & ORT, "ONNX Runtime must not be a core dependency: users have one flavour"
    assert _names(EXTRAS["cpu"]) == {"onnxruntime"} and _names(EXTRAS["gpu"]) == {"onnxruntime-gpu"}
    for name, reqs in EXTRAS.items():  # no other extra drags in a second flavour
        if name not in ("cpu", "gpu"):
            assert not _names(reqs) & ORT, f"extra {name} brings ONNX Runtime"


def test_what_only_one_command_needs_is_an_extra():
    core = _names(CORE)
    for pkg in ("nvidia-pytriton", "tritonclient", "tensorrt-rtx-cu13", "polygraphy", "matplotlib",
                "openvino"):
        assert pkg not in core, f"{pkg} is needed by one command only: it belongs in an extra"


def test_hint_extras_exist_with_the_packages_they_name():
    for extra, packages in deps.EXTRAS.items():
        assert extra in EXTRAS, f"deps.EXTRAS names [{extra}], which pyproject.toml lacks"
        named = {canonicalize_name(Requirement(p).name) for p in packages.split()}
        assert named <= _names(EXTRAS[extra]), f"[{extra}] does not bring {named - _names(EXTRAS[extra])}"


def test_lock_pins_every_dependency_inside_its_range():
    """constraints.txt (what make install and CI use) satisfies the ranges users get: a range that
    excluded what we test with would fail here."""
    lock = _lock()
    env = default_environment()
    for req in CORE + EXTRAS["cpu"] + [r for e in ("dev", "trt", "serve", "plot") for r in EXTRAS[e]]:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name == "idle-export":
            continue
        assert name in lock, f"constraints.txt has no pin for {name}"
        assert req.specifier.contains(lock[name], prereleases=True), \
            f"constraints.txt pins {name}=={lock[name]}, outside {req}"


# ----------------------------------------------------------------------------- ONNX Runtime


def _hide_onnxruntime(monkeypatch, distributions: list[str]) -> None:
    """`import onnxruntime…` raises ImportError; `distributions` are what metadata says is there."""
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(deps, "ort_distributions", lambda: distributions)


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """This process as if neither onnxruntime nor onnxruntime-gpu were installed."""
    _hide_onnxruntime(monkeypatch, [])


def _one_line_exit_3(result, *needles: str) -> str:
    assert result.exit_code == EXIT_MISSING_DEPENDENCY, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.usefixtures("no_onnxruntime")
def test_check_without_onnxruntime_names_both_extras(tiny_ckpt, tiny_folded_onnx):
    result = CliRunner().invoke(app, ["check", str(tiny_folded_onnx), "--ckpt", str(tiny_ckpt),
                                      "--batch", "1", "--inputs", "noise"])
    _one_line_exit_3(result, "ONNX Runtime is not installed", 'pip install "idle-export[cpu]"',
                     '"idle-export[gpu]"')


@pytest.mark.usefixtures("no_onnxruntime")
def test_calibrate_without_onnxruntime_exit_3_and_no_file(tiny_folded_onnx, tmp_path):
    out = tmp_path / "int8.onnx"
    result = CliRunner().invoke(app, ["calibrate", str(tiny_folded_onnx), "-o", str(out), "--num", "4",
                                      "--no-cache"])
    _one_line_exit_3(result, "ONNX Runtime is not installed", "idle-export[cpu]")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_onnxruntime")
def test_api_raises_the_same_error(tiny_folded_onnx):
    with pytest.raises(MissingDependencyError) as info:
        api.check(tiny_folded_onnx, against=tiny_folded_onnx, batch_sizes=(1,), inputs=("noise",))
    assert "idle-export[gpu]" in info.value.hint and info.value.exit_code == 3


def test_calibrate_with_an_older_onnxruntime_names_the_version(tiny_folded_onnx, tmp_path, monkeypatch):
    """ONNX Runtime < 1.31 runs our graphs but its quantization preprocessing fails on them."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.30.0")
    result = CliRunner().invoke(app, ["calibrate", str(tiny_folded_onnx), "-o", str(tmp_path / "i8.onnx"),
                                      "--num", "4", "--no-cache"])
    _one_line_exit_3(result, "INT8 calibration needs ONNX Runtime 1.31 or newer; onnxruntime 1.30.0 is "
                     'installed (hint: pip install --upgrade "onnxruntime>=1.31")')
    assert list(tmp_path.iterdir()) == []


def test_both_flavours_installed_is_named(monkeypatch):
    _hide_onnxruntime(monkeypatch, ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(MissingDependencyError) as info:
        deps.import_onnxruntime()
    assert "overwritten each other's files" in info.value.message
    assert info.value.hint.startswith("pip uninstall -y onnxruntime onnxruntime-gpu, then")


def test_one_flavour_with_missing_files_is_reinstalled(monkeypatch):
    _hide_onnxruntime(monkeypatch, ["onnxruntime-gpu"])
    with pytest.raises(MissingDependencyError) as info:
        deps.import_onnxruntime("quantization")
    assert "onnxruntime-gpu is installed but import onnxruntime.quantization fails" in info.value.message
    assert info.value.hint == "pip install --upgrade --force-reinstall onnxruntime-gpu"


def test_a_submodule_dependency_is_named(monkeypatch, tmp_path):
    """A package that an onnxruntime submodule imports, not ONNX Runtime itself, is what is named."""
    import onnxruntime

    (tmp_path / "idle_export_fake_sub.py").write_text("import no_such_package_xyz\n")
    monkeypatch.setattr(onnxruntime, "__path__", [*onnxruntime.__path__, str(tmp_path)])
    with pytest.raises(MissingDependencyError) as info:
        deps.import_onnxruntime("idle_export_fake_sub")
    assert info.value.message == ("onnxruntime.idle_export_fake_sub needs no_such_package_xyz, which is "
                                  "not installed")
    assert info.value.hint == "pip install no_such_package_xyz"


def test_installed_flavour_is_found():
    """Whichever flavour is installed (constraints.txt: onnxruntime) is found and imported."""
    import importlib.metadata as md

    (dist,) = deps.ort_distributions()
    assert deps.import_onnxruntime().__version__ == md.version(dist)
    assert deps.import_onnxruntime("quantization").__name__ == "onnxruntime.quantization"


# ----------------------------------------------------------------------------- hints


def _string_constants(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def test_hints_that_install_an_extras_package_name_the_extra():
    """`pip install matplotlib` in a hint hides that the extra exists: a hint installing a package
    that an extra brings names the extra (deps.pip_extra), the bare package as an alternative."""
    packages = {canonicalize_name(Requirement(p).name): extra for extra, text in deps.EXTRAS.items()
                for p in text.split()}
    bad = []
    for path in sorted([*(ROOT / "idle_export").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]):
        for line, text in _string_constants(path):
            for m in re.finditer(r"pip install ((?:[\w.\-\[\]]+\s?)+)", text):
                named = {canonicalize_name(Requirement(w).name) for w in m.group(1).split()
                         if not w.startswith("-") and re.match(r"^[\w.\-]+(\[[\w,]+\])?$", w)}
                for pkg in named & set(packages):
                    if f"idle-export[{packages[pkg]}]" not in text:
                        bad.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
            for extra in re.findall(r"idle-export\[([a-z0-9_-]+)\]", text):
                if extra not in EXTRAS:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: no extra [{extra}] in pyproject.toml")
    assert not bad, "hints that should name the extra (deps.pip_extra):\n" + "\n".join(bad)


def _hide(monkeypatch, top: str) -> None:
    """`import TOP…` raises ImportError in this process, as when the package is not installed."""
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, top, None)


def test_serve_query_without_tritonclient_names_the_serve_extra(monkeypatch, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "cat.png")
    _hide(monkeypatch, "tritonclient")
    result = CliRunner().invoke(app, ["serve", "query", "http://127.0.0.1:9", str(tmp_path / "cat.png")])
    _one_line_exit_3(result, "tritonclient", 'pip install "idle-export[serve]"')


def test_bench_plot_without_matplotlib_fails_before_the_benchmark(monkeypatch, tiny_folded_onnx,
                                                                 tiny_dense_onnx, tmp_path):
    _hide(monkeypatch, "matplotlib")
    result = CliRunner().invoke(app, ["bench", str(tiny_folded_onnx), str(tiny_dense_onnx), "--batch", "1",
                                      "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    _one_line_exit_3(result, "--plot needs matplotlib", 'pip install "idle-export[plot]"')
    assert "images/s" not in result.output and list(tmp_path.iterdir()) == []  # nothing ran or was written
