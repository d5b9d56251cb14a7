"""A TensorRT engine as a Runner, run by Polygraphy's TrtRunner (its CUDA buffers and streams).

Our own code only checks, before any GPU work, that the engine's sidecar matches this runtime
(flavour, version, compute capability) and turns failures into one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from idle_export.deps import pip_extra
from idle_export.errors import BadInputError, IdleExportError, MissingDependencyError
from idle_export.hardware import gpu_info
from idle_export.onnx.elastic import permille
from idle_export.runtime.base import Runner
from idle_export.trt.flavour import FLAVOUR_NAMES, import_trt
from idle_export.trt.sidecar import compatibility_problems, inspect_engine

POLYGRAPHY_PIP = pip_extra("trt")


def import_polygraphy_trt(flavour: str):
    """polygraphy.backend.trt, bound to TensorRT or TensorRT-RTX (Polygraphy picks the module
    once, from polygraphy.config.USE_TENSORRT_RTX, when its TensorRT backend is first imported)."""
    import sys

    try:
        import polygraphy.config as pg_config
    except ImportError:
        raise MissingDependencyError("running a TensorRT engine needs Polygraphy", POLYGRAPHY_PIP) from None
    want_rtx = flavour == "tensorrt_rtx"
    if "polygraphy.backend.trt" in sys.modules and pg_config.USE_TENSORRT_RTX != want_rtx:
        raise IdleExportError("Polygraphy is already bound to another TensorRT flavour in this process",
                              "run engines of one flavour per process")
    pg_config.USE_TENSORRT_RTX = want_rtx
    import polygraphy.backend.trt as pg_trt

    return pg_trt


def engine_keep_feed(sidecar: dict, keep_rate: float | None, what: str) -> dict:
    """The keep_permille feed of an elastic engine (its default when keep_rate is None); {} for
    a fixed-K engine asked for no rate. A rate outside the engine's profile range is refused."""
    info = sidecar.get("elastic")
    if not info:
        own = sidecar.get("model", {}).get("idle_export.keep_rate")
        if keep_rate is not None and (own is None or np.float32(json.loads(own)) != np.float32(keep_rate)):
            raise BadInputError(f"{what} is a fixed-K engine; it runs at no other keep rate",
                                "build it from an elastic file: idle-export trt MODEL.onnx --elastic")
        return {}
    value = info["default"] if keep_rate is None else permille(keep_rate)
    if not info["min"] <= value <= info["max"]:
        raise BadInputError(f"keep rate {value / info['scale']:g} is outside {what}'s range "
                            f"{info['min'] / info['scale']:g}..{info['max'] / info['scale']:g}",
                            "rebuild with a wider `idle-export trt --elastic --keep-range MIN:OPT:MAX`")
    return {info["input"]: np.asarray(value, dtype=np.int64)}


class TrtRunner(Runner):
    """A TensorRT engine on GPU 0 (`with r: out = r.infer({"images": x})`).

    Refuses, with a one-line error, an engine whose sidecar does not match the runtime
    (flavour/version, compute capability) and, without a GPU, raises MissingDependencyError.
    """

    def __init__(self, engine: str | Path, *, name: str | None = None, keep_rate: float | None = None):
        self.path = Path(engine)
        self.keep_rate = keep_rate  # an elastic engine's rate (`trt --elastic`; None: the default)
        self._extra: dict = {}
        self.name = name or f"tensorrt:{self.path.name}"
        self.sidecar: dict = {}
        self._runner = None

    def activate(self) -> None:
        self.sidecar = inspect_engine(self.path)
        flavour = self.sidecar.get("flavour")
        try:
            trt = import_trt(flavour)
        except MissingDependencyError:
            pin = "tensorrt-rtx-cu13" if flavour == "tensorrt_rtx" else "tensorrt"
            raise MissingDependencyError(
                f"{self.path.name} needs {FLAVOUR_NAMES.get(flavour, flavour)} "
                f"{self.sidecar.get('trt_version')}, which is not installed",
                f"pip install {pin}=={self.sidecar.get('trt_version')}") from None
        problems = compatibility_problems(self.sidecar, trt, None)
        if problems:
            raise BadInputError(f"{self.path.name}: {problems[0]}", "rebuild it with `idle-export trt` here")
        gpu = gpu_info()
        if gpu is None:
            raise MissingDependencyError("running a TensorRT engine needs an NVIDIA GPU; none found",
                                         "run it on a machine with an NVIDIA GPU and driver; engines "
                                         "can be built here with `idle-export trt MODEL.onnx --target smXX`")
        problems = compatibility_problems(self.sidecar, None, gpu["compute_capability"])
        if problems:
            raise BadInputError(f"{self.path.name}: {problems[0]}",
                                "rebuild it on this machine (or with `idle-export trt --target` for "
                                "this GPU)")
        self._extra = engine_keep_feed(self.sidecar, self.keep_rate, self.path.name)
        pg_trt = import_polygraphy_trt(flavour)
        profile = self.sidecar["profiles"][0]
        self.input_name = profile["input"]
        self.min_batch, self.max_batch = profile["min"][0], profile["max"][0]
        self._runner = pg_trt.TrtRunner(pg_trt.EngineFromBytes(self.path.read_bytes()), name=self.name)
        self._runner.activate()

    def deactivate(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
        self._runner = None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(feed["images"], dtype=np.float32)
        if not self.min_batch <= x.shape[0] <= self.max_batch:
            raise BadInputError(f"batch {x.shape[0]} is outside the engine's profile "
                                f"{self.min_batch}..{self.max_batch}",
                                "rebuild with a wider `idle-export trt --profile MIN:OPT:MAX`")
        extra = self._extra if feed.get("keep_rate") is None else \
            engine_keep_feed(self.sidecar, feed["keep_rate"], self.path.name)  # this call only
        out = self._runner.infer({self.input_name: x, **extra})
        return {name: np.array(value) for name, value in out.items()}
