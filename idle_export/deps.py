"""Optional dependencies: the extra that brings each one, the pip command that a
MissingDependencyError names, and ONNX Runtime as the user has it (`onnxruntime` or
`onnxruntime-gpu`, whichever is installed; docs/install.md)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
from types import ModuleType

from idle_export.errors import MissingDependencyError

# The extras of pyproject.toml that a command may need, and the packages each brings
# (tests/test_deps.py checks both against pyproject.toml).
EXTRAS = {
    "cpu": "onnxruntime",
    "gpu": "onnxruntime-gpu",
    "trt": "tensorrt-rtx-cu13 polygraphy",
    "serve": "nvidia-pytriton tritonclient[http,grpc] aiohttp uvloop",
    "plot": "matplotlib",
    "openvino": "openvino nncf",
}

# Distributions that install the `onnxruntime` module. Any one of them will do; two of them
# overwrite each other's files.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "onnxruntime-qnn", "onnxruntime-training")

# Module → distribution, where the two names differ, for modules that ONNX Runtime's tools import.
_DISTRIBUTION_OF = {"google": "protobuf", "yaml": "pyyaml", "PIL": "pillow"}

ORT_HINT = ('pip install "idle-export[cpu]" (onnxruntime) or "idle-export[gpu]" (onnxruntime-gpu): '
            "one of the two, never both")


def pip_extra(extra: str) -> str:
    """The hint that installs an extra: `pip install "idle-export[EXTRA]" (or: pip install PKG…)`."""
    return f'pip install "idle-export[{extra}]" (or: pip install {EXTRAS[extra]})'


def ort_distributions() -> list[str]:
    """The installed distributions that provide the `onnxruntime` module (normally one or none)."""
    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            md.version(name)
        except md.PackageNotFoundError:
            continue
        found.append(name)
    return found


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def import_onnxruntime(submodule: str | None = None, *, at_least: str | None = None,
                       needed_for: str = "this") -> ModuleType:
    """`onnxruntime`, or `onnxruntime.SUBMODULE` ("quantization", "transformers.optimizer" …),
    from whichever ONNX Runtime distribution is installed.

    Raises MissingDependencyError (exit 3) with a hint that names the extras when none is
    installed, when its files are missing or broken, when a submodule needs a package that is
    not there, or when ONNX Runtime is older than `at_least` (`needed_for` says what needs it).
    """
    name = "onnxruntime" + (f".{submodule}" if submodule else "")
    try:
        module = importlib.import_module(name)
        root = importlib.import_module("onnxruntime")
    except ImportError as e:
        missing = e.name or ""
        detail = (str(e).splitlines() or [""])[0][:160]
    else:
        version = str(getattr(root, "__version__", "0"))
        if at_least and _version_tuple(version) < _version_tuple(at_least):
            dist = (ort_distributions() or ["onnxruntime"])[0]
            raise MissingDependencyError(f"{needed_for} needs ONNX Runtime {at_least} or newer; "
                                         f"{dist} {version} is installed",
                                         f'pip install --upgrade "{dist}>={at_least}"')
        return module
    dists = ort_distributions()
    top = missing.split(".")[0]
    if top and top != "onnxruntime":  # a package that the (sub)module imports
        raise MissingDependencyError(f"{name} needs {missing}, which is not installed",
                                     f"pip install {_DISTRIBUTION_OF.get(top, top)}")
    if not dists:
        raise MissingDependencyError("ONNX Runtime is not installed (neither onnxruntime nor "
                                     "onnxruntime-gpu)", ORT_HINT)
    if len(dists) > 1:
        raise MissingDependencyError(
            f"{' and '.join(dists)} are both installed and have overwritten each other's files "
            f"(import {name}: {detail})",
            f"pip uninstall -y {' '.join(dists)}, then {ORT_HINT}")
    raise MissingDependencyError(f"{dists[0]} is installed but import {name} fails ({detail})",
                                 f"pip install --upgrade --force-reinstall {dists[0]}")
