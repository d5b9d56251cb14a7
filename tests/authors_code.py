"""Import the EViT and DynamicViT authors' model code from local git mirrors of their
repositories (github.com/youweiliang/evit, github.com/raoyongming/DynamicViT), for tests that
compare our modules with theirs on the same weights. Nothing is downloaded: without a mirror
(IDLE_EXPORT_AUTHORS_MIRROR, default /work/.mirror) the caller skips."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

MIRROR = Path(os.environ.get("IDLE_EXPORT_AUTHORS_MIRROR", "/work/.mirror"))
REPOS = {"evit": "youweiliang+evit", "dynamicvit": "raoyongming+DynamicViT"}


class Unavailable(Exception):
    """The authors' code cannot be imported here (the reason is the message)."""


def _show(repo: str, path: str) -> str:
    git_dir = MIRROR / REPOS[repo] / "repo"
    if not git_dir.is_dir():
        raise Unavailable(f"no mirror of {REPOS[repo]} at {git_dir}")
    try:
        return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Unavailable(f"cannot read {path} from {git_dir}: {exc}") from None


def _load(name: str, source: str, deps: dict[str, types.ModuleType], tmp: Path, monkeypatch):
    """Execute `source` as module `name` with `deps` standing in sys.modules (restored after
    the test by monkeypatch); timm's model registry is not touched."""
    import timm.models.registry

    monkeypatch.setattr(timm.models.registry, "register_model", lambda fn: fn)
    for dep, mod in deps.items():
        monkeypatch.setitem(sys.modules, dep, mod)
    path = tmp / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # an API of their timm era that this timm lacks
        raise Unavailable(f"{name}: {type(exc).__name__}: {exc}") from None
    return module


def _function(source: str, name: str) -> types.ModuleType:
    """A module holding only function `name` cut from `source` (their utils.py imports much
    more than the function needs)."""
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    mod = types.ModuleType(f"authors_{name}")
    exec("import torch\n" + ast.get_source_segment(source, node), mod.__dict__)  # noqa: S102
    return mod


def import_evit(tmp: Path, monkeypatch):
    """The authors' evit.py (EViT class); helpers.py's torchprofile import stubbed out."""
    helpers = types.ModuleType("helpers")
    helpers.__dict__.update(_function(_show("evit", "helpers.py"), "complement_idx").__dict__)
    return _load("authors_evit", _show("evit", "evit.py"), {"helpers": helpers}, tmp, monkeypatch)


def import_dyvit(tmp: Path, monkeypatch):
    """The authors' models/dyvit.py, with `utils.batch_index_select` recording the token index
    of every gather of the [B, N, C] tokens into `module.gathers`."""
    select = _function(_show("dynamicvit", "utils.py"), "batch_index_select").batch_index_select
    gathers: list = []

    def recording(x, idx):
        if x.dim() == 3 and x.shape[-1] > 1:  # the tokens, not prev_decision [B, N, 1]
            gathers.append(idx.clone())
        return select(x, idx)

    utils = types.ModuleType("utils")
    utils.batch_index_select = recording
    module = _load("authors_dyvit", _show("dynamicvit", "models/dyvit.py"), {"utils": utils}, tmp,
                   monkeypatch)
    module.gathers = gathers
    return module
