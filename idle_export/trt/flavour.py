"""Which TensorRT: `tensorrt` (10/11, needs a GPU to build) or `tensorrt_rtx` (builds without one),
imported lazily, with its version, typing rules, target names and a logger that keeps messages."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from idle_export.deps import pip_extra
from idle_export.errors import BadInputError, MissingDependencyError

PRECISIONS = ("fp32", "fp16", "int8")


FLAVOURS = ("tensorrt", "tensorrt_rtx")


FLAVOUR_NAMES = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}


PIP = {
    "tensorrt": "pip install tensorrt (TensorRT 10/11, builds and runs on an NVIDIA GPU)",
    "tensorrt_rtx": pip_extra("trt")
    + "; it builds without a GPU: `idle-export trt MODEL.onnx --target sm89`",
}


# Harmless on a machine without GPU: the RTX builder probes the driver, then cross-builds.
_NO_GPU_NOISE = ("CUDA driver version is insufficient", "Error reading CUDA GPU properties",
                 "no CUDA-capable device", "cudaError 35", "cudaError 100")


@dataclass(frozen=True)
class TrtInfo:
    """The TensorRT module found: flavour ('tensorrt'|'tensorrt_rtx') and version."""

    module: object
    flavour: str
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def strongly_typed(self) -> bool:
        """RTX always; TensorRT from 11 on (builder flags for FP16/INT8 are gone)."""
        return self.flavour == "tensorrt_rtx" or self.major >= 11

    @property
    def label(self) -> str:
        return f"{FLAVOUR_NAMES[self.flavour]} {self.version}"


def import_trt(flavour: str | None = None) -> TrtInfo:
    """Import TensorRT lazily; `flavour` None tries tensorrt, then tensorrt_rtx."""
    import importlib

    flavour = flavour or os.environ.get("IDLE_EXPORT_TRT") or None
    if flavour is not None and flavour not in FLAVOURS:
        raise BadInputError(f"unknown TensorRT flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
    reasons = []
    for name in ([flavour] if flavour else list(FLAVOURS)):
        try:
            mod = importlib.import_module(name)
        except ImportError as e:  # also None in sys.modules, broken shared libraries
            reasons.append(f"{name}: {str(e).splitlines()[0] if str(e) else 'not installed'}")
            continue
        return TrtInfo(mod, name, str(getattr(mod, "__version__", "0")))
    wanted = [flavour] if flavour else list(FLAVOURS)
    raise MissingDependencyError(
        f"no TensorRT found ({'; '.join(reasons)})",
        " or ".join(PIP[f] for f in wanted))


def parse_target(text: str | None, trt: TrtInfo | None = None) -> str | None:
    """'sm89' / '89' / '8.9' → 'sm89' (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"(?:sm_?)?(\d)\.?(\d{1,2})", text.strip().lower())
    if not m:
        raise BadInputError(f"target={text!r} is not a compute capability", "e.g. target=sm89")
    target = f"sm{m.group(1)}{m.group(2)}"
    if trt is not None and trt.flavour == "tensorrt_rtx":
        known = [c.lower() for c in trt.module.ComputeCapability.__members__
                 if c.startswith("SM")]
        if target not in known:
            raise BadInputError(f"TensorRT-RTX {trt.version} cannot build for {target}",
                                f"choose one of {', '.join(known)}")
    return target


def make_logger(trt: TrtInfo, verbose: bool, echo: Callable[[str], None]):
    mod = trt.module
    sev = mod.ILogger.Severity

    class CapturingLogger(mod.ILogger):
        """Keeps every message (for one-line errors); echoes warnings, or all with -v."""

        def __init__(self):
            mod.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))
            noise = any(s in msg for s in _NO_GPU_NOISE)
            if verbose or (severity in (sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING) and not noise):
                echo(f"[{trt.flavour}] {severity.name}: {msg}")

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in (sev.INTERNAL_ERROR, sev.ERROR)
                    and not any(n in m for n in _NO_GPU_NOISE)]

    return CapturingLogger()


class Interruptible:
    """Ctrl+C / SIGTERM during a TensorRT build: TensorRT calls back into Python (logger, progress)
    and swallows a KeyboardInterrupt raised there, then writes the engine anyway. So the signals
    only set a flag while the build runs; a progress monitor (TensorRT ≥ 10, RTX) asks TensorRT to
    stop at its next step, and `check()` raises KeyboardInterrupt after the build returns."""

    def __init__(self, trt: TrtInfo):
        self.trt, self.signal, self.previous = trt, None, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _on_signal(self, signum, frame):
        import signal

        self.signal = signal.Signals(signum).name

    def monitor(self):
        """An IProgressMonitor that cancels the build once a signal came (None without the API)."""
        mod = self.trt.module
        if not hasattr(mod, "IProgressMonitor"):
            return None
        outer = self

        class Cancel(mod.IProgressMonitor):
            def __init__(self):
                mod.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                pass

            def phase_finish(self, phase_name):
                pass

            def step_complete(self, phase_name, step):
                return outer.signal is None  # False: TensorRT stops the build

        return Cancel()

    def check(self) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt("SIGTERM" if self.signal == "SIGTERM" else "")
