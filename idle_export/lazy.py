"""Modules loaded on first use, so light modules can name heavy ones at their top.

`vit = lazy_module("idle_export.model.vit")` at the top of a file binds `vit` at once, but the
module (and torch, which it imports) loads only when an attribute is first read. Our modules that
import torch, onnx or onnxruntime at top level are named this way by the modules the CLI imports,
so `idle-export --help` stays instant and every in-package import stays at the top of its file.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """The module `name`, executed on first attribute access (importlib.util.LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module
