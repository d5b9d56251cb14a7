"""The authors' IdleVisionTransformer (GitHub Ackesnal/IdleViT, vit.py eval path) as a Runner,
imported from the user's clone at run time; nothing of it is copied into this package."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np

from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.runtime.base import Runner


class OfficialRunner(Runner):
    """The authors' IdleVisionTransformer (vit.py, eval `test=True` path) in eager PyTorch."""

    def __init__(self, model, *, threads: int | None = None, name: str = "torch-official"):
        self.model = model
        self.threads = threads
        self.name = name

    def activate(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model.eval()

    def infer(self, feed):
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feed["images"])))
        return {"logits": out.numpy()}


def _stub_module(name: str):
    import types

    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so `from name.sub import x` finds stubs too

    def __getattr__(attr):  # any name imported from an unused module: a harmless placeholder
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {"__init__": lambda self, *a, **k: None})

    mod.__getattr__ = __getattr__
    return mod


def load_official_vit(repo: str | Path):
    """Import the authors' vit.py from a clone of Ackesnal/IdleViT without copying it.

    Its `from utils import batch_index_select` is served by the clone's own utils.py; imports
    the eval path does not use and that are not installed are stubbed, at runtime only."""
    import importlib.util

    repo = Path(repo)
    vit_py, utils_py = repo / "vit.py", repo / "utils.py"
    if not vit_py.is_file() or not utils_py.is_file():
        raise BadInputError(f"official_repo={repo} has no vit.py and utils.py",
                            "pass a clone of https://github.com/Ackesnal/IdleViT")
    saved = {k: sys.modules.get(k) for k in ("utils",)}
    stubs: list[str] = []
    try:
        for _ in range(10):
            try:
                utils_spec = importlib.util.spec_from_file_location("utils", utils_py)
                utils = importlib.util.module_from_spec(utils_spec)
                sys.modules["utils"] = utils
                utils_spec.loader.exec_module(utils)
                spec = importlib.util.spec_from_file_location("idle_export_official_vit", vit_py)
                module = importlib.util.module_from_spec(spec)
                with contextlib.redirect_stdout(io.StringIO()):
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        spec.loader.exec_module(module)
                return module
            except ModuleNotFoundError as e:
                if not e.name or e.name in stubs or e.name.split(".")[0] in ("torch", "timm", "numpy"):
                    raise
                stubs.append(e.name)
                sys.modules[e.name] = _stub_module(e.name)
        raise BadInputError("could not import the official vit.py", "check the clone")
    except ModuleNotFoundError as e:
        raise MissingDependencyError(f"the official vit.py needs {e.name}, which is not installed",
                                     f"pip install {e.name}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for name in stubs:
            sys.modules.pop(name, None)


def build_official_model(repo: str | Path, spec, state_dict: dict):
    """IdleVisionTransformer with the checkpoint's weights and the spec's K per layer."""
    import torch

    module = load_official_vit(repo)
    n = spec.num_patches
    # the official code keeps int(N * ratio) tokens; (K + 0.5) / N gives exactly K for any K
    ratios = [(k + 0.5) / n for k in spec.keep_k]
    with contextlib.redirect_stdout(io.StringIO()):
        model = module.IdleVisionTransformer(
            img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim,
            depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=4, qkv_bias=True,
            num_classes=spec.num_classes, idle_layers=list(spec.idle_layers), keep_ratios=ratios)
    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise BadInputError(f"the official model misses weights {missing[:3]} in the checkpoint",
                            "pass a DeiT IdleViT checkpoint (timm key names)")
    return model.eval()
