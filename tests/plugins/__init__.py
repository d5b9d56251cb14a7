"""Tests of the fused idle-layer kernels (``plugins/``, installed as ``idle_export.plugins``).

:func:`load_plugins` returns that package: ``idle_export.plugins`` when it is importable, else
the checkout's ``plugins/`` folder loaded as the package ``idle_export_plugins_dev`` (its
modules import each other relatively, so either name works).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PLUGINS_DIR = REPO / "plugins"
DEV_NAME = "idle_export_plugins_dev"


def load_plugins() -> ModuleType:
    """The plugins package (installed name first, else the checkout's folder)."""
    try:
        return importlib.import_module("idle_export.plugins")
    except ModuleNotFoundError as exc:
        if exc.name not in ("idle_export", "idle_export.plugins"):
            raise
    if DEV_NAME in sys.modules:
        return sys.modules[DEV_NAME]
    spec = importlib.util.spec_from_file_location(
        DEV_NAME, PLUGINS_DIR / "__init__.py", submodule_search_locations=[str(PLUGINS_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[DEV_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[DEV_NAME]
        raise
    return module


def load_module(name: str) -> ModuleType:
    """A submodule of the plugins package, e.g. ``load_module("spec")``."""
    return importlib.import_module(f"{load_plugins().__name__}.{name}")


def run_worker(mode: str, *, interpret: bool, timeout: float = 300,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``tests.plugins.worker <mode>`` in a fresh interpreter (triton imported there
    first), with TRITON_INTERPRET=1 or with it removed."""
    env = {**os.environ, **(extra_env or {})}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "tests.plugins.worker", mode], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
