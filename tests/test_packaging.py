"""The wheel as a user gets it: built from this tree, installed (not editable) into a fresh virtualenv,
it runs `idle-export --version`, `idle-export demo` on DeiT-Tiny and a Python API call; and its
requirements resolve for Python 3.10, 3.12 and 3.13 (docs/install.md).

The fresh virtualenv gets the wheel alone (`pip install --no-deps`); the dependencies come from
this test run's environment, which `make install` installed from constraints.txt, through a .pth
file. A .pth line is appended to sys.path after the virtualenv's own site-packages, so the
wheel's idle_export wins over the checkout, and the .pth files of that environment (the editable
install's finder) are not run: the test checks that idle_export, its plugins and every module
are imported from the wheel, and that the dependencies it sees are the locked versions. This
costs seconds instead of a second 5.6 GB install of torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "ProxyError", "ConnectTimeout", "Connection refused",
                  "Name or service not known", "ReadTimeoutError", "Could not fetch URL")


def _run(cmd: list, *, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _source_files() -> list[Path]:
    """What a clone has (tracked files, and new ones that git does not ignore)."""
    try:
        out = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is None or out.returncode != 0:  # no git: the files the build reads
        return [p.relative_to(ROOT) for p in (ROOT / "pyproject.toml", ROOT / "README.md")] + [
            p.relative_to(ROOT) for d in ("idle_export", "plugins") for p in (ROOT / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
    return [Path(line) for line in out.stdout.splitlines()
            if line and not line.startswith(("tests/", "docs/")) and (ROOT / line).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the tree (the build writes build/ and *.egg-info beside its
    sources: not into the checkout that others work in)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                "--disable-pip-version-check", "-w", base / "dist", src], cwd=base)
    assert out.returncode == 0, out.stderr[-3000:]
    wheels = list((base / "dist").glob("idle_export-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(name).decode())


def test_wheel_contents(wheel):
    """Every file of the package (modules and any data beside them), the plugins under
    idle_export.plugins (not a top-level `plugins`), the console script; ranges, not pins."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    sources = set()
    for rel in _source_files():
        if rel.parts[0] == "idle_export":
            sources.add(rel.as_posix())
        elif rel.parts[0] == "plugins":
            sources.add(Path("idle_export", *rel.parts).as_posix())
    assert "idle_export/plugins/spec.py" in sources and "idle_export/cli/app.py" in sources
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert not any(n.startswith(("plugins/", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        assert "idle-export = idle_export.cli:run" in zf.read(entry).decode()
    requires = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist")]
    core = [r for r in requires if r.marker is None]
    assert core and all(">=" in {s.operator for s in r.specifier} for r in core), core


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


# Run inside the fresh virtualenv: where idle_export comes from, and the versions of what it needs.
PROBE = """
import importlib, importlib.metadata as md, importlib.util, json, pkgutil, sys
from packaging.requirements import Requirement
import idle_export, idle_export.plugins
mods = [m.name for m in pkgutil.walk_packages(idle_export.__path__, "idle_export.")
        if not m.name.endswith("__main__")]
if importlib.util.find_spec("triton") is None:  # the fused kernels need triton (a CUDA torch's)
    mods.remove("idle_export.plugins.kernels")
files = {m: importlib.import_module(m).__file__ for m in mods}
reqs = [Requirement(r) for r in md.requires("idle-export")]
names = [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": "cpu"})]
print(json.dumps({"file": idle_export.__file__, "modules": files, "prefix": sys.prefix,
                  "version": md.version("idle-export"), "deps": {n: md.version(n) for n in names}}))
"""

API_CALL = """
import json, sys
from idle_export import api
folder = sys.argv[1]
ckpt = api.load_checkpoint(f"{folder}/deit_tiny_r0.7_demo.pth")
out = api.export_onnx(ckpt, f"{folder}/api_idle.onnx", keep=0.5)
spec = api.model_spec(ckpt, keep=0.5)
report = api.check(out, ckpt=ckpt, batch_sizes=(2,), inputs=("noise",))
lint = api.lint(out, expect_idle=True)
print(json.dumps({"passed": report["passed"], "model": report["model"], "keep_k": list(spec.keep_k),
                  "lint": lint["passed"], "topk": lint["ops"].get("TopK", 0)}))
"""


def test_wheel_installs_into_a_fresh_venv_and_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    out = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    python = venv / "bin" / "python"
    out = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
                "--disable-pip-version-check", wheel], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_idle_export_test_deps.pth").write_text("\n".join(ours) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"

    # where everything is imported from, and what it runs with
    out = _run([python, "-c", PROBE], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout)
    assert Path(probe["file"]).is_relative_to(site), f"idle_export came from {probe['file']}, not the wheel"
    outside = {m: f for m, f in probe["modules"].items() if not Path(f).is_relative_to(site)}
    assert not outside, f"imported from outside the wheel: {outside}"
    assert "idle_export.plugins.spec" in probe["modules"] and "idle_export.cli.app" in probe["modules"]
    lock = _lock()
    drift = {n: (v, lock.get(canonicalize_name(n))) for n, v in probe["deps"].items()
             if lock.get(canonicalize_name(n)) != v}
    assert not drift, (f"{sys.prefix} differs from constraints.txt (installed, locked): {drift}; "
                       "`touch constraints.txt && make install` reinstalls the locked versions")

    exe = venv / "bin" / "idle-export"
    out = _run([exe, "--version"], cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout.strip() == f"idle-export {probe['version']}", out
    out = _run([exe, "demo", "--arch", "deit_tiny", "-o", tmp_path / "demo", "--batch", "1,2",
                "--json", tmp_path / "demo.json"], cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert demo["passed"] and [r["topk"] for r in demo["rows"]] == [9, 0]

    out = _run([python, "-c", API_CALL, tmp_path / "demo"], cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"passed": True, "model": result["model"], "keep_k": result["keep_k"], "lint": True,
                      "topk": 9}
    assert "keep 0.5" in result["model"] and result["keep_k"][0] == 98  # 196 patches × 0.5


# ----------------------------------------------------------------------------- resolution

RESOLVE_PYTHONS = ("3.10", "3.12", "3.13")


def _resolve(wheel: Path, python: str, workdir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    report = workdir / f"resolve-{python}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--python-version", python, "--only-binary=:all:",
           "--target", workdir / f"target-{python}", "--report", report, f"{wheel}[cpu]"]
    return _run(cmd, cwd=workdir, timeout=900), report


@pytest.mark.registry
def test_wheel_requirements_resolve_on_newer_pythons(wheel, tmp_path):
    """pip resolves the wheel with [cpu] for each Python from binary wheels alone (a dry run:
    nothing is installed), as a user's `pip install "idle-export[cpu]"` would; numpy 1.26, which
    has no wheel for 3.13, must not be required there."""
    if os.environ.get("IDLE_EXPORT_OFFLINE"):
        pytest.skip("IDLE_EXPORT_OFFLINE is set: no package registry to resolve against")
    with ThreadPoolExecutor(len(RESOLVE_PYTHONS)) as pool:
        runs = dict(zip(RESOLVE_PYTHONS, pool.map(lambda v: _resolve(wheel, v, tmp_path), RESOLVE_PYTHONS)))
    for python, (out, report) in runs.items():
        if out.returncode != 0 and any(e in out.stderr for e in NETWORK_ERRORS):
            pytest.skip(f"no package registry answers (pip: {out.stderr.strip().splitlines()[-1][:200]})")
        assert out.returncode == 0, f"Python {python}: {out.stderr[-3000:]}"
        got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
               for i in json.loads(report.read_text())["install"]}
        for name in ("idle-export", "torch", "timm", "onnx", "numpy", "onnxruntime"):
            assert name in got, f"Python {python}: {name} not in the resolution"
        assert "onnxruntime-gpu" not in got, f"Python {python}: [cpu] must not bring onnxruntime-gpu"
        if python == "3.13":
            assert int(got["numpy"].split(".")[0]) >= 2, got["numpy"]
