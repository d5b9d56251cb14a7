"""The runtime registry: every runtime a command can run a model on, one record each.

`check`, `bench`, `sweep`, `show`, `serve` and the API take their choices, their help texts and
their error texts from here; nothing else spells a runtime's name. A record says what the
runtime runs (an ONNX file, an engine, a torch model), the pip extra it needs, the export target
whose files suit it (onnx.targets), the precisions it computes in, whether it reports the kept
tokens, whether it computes on the CPU (bench reports CPU time for those), whether it is there
(`unavailable()`: the reason, or None) and how its Runner is made (`runner(...)`).

Adding a runtime: its Runner in runtime/<name>.py (the interface of runtime/base.py) and one
`Runtime(...)` in RUNTIMES below. The record is light: the Runner's module is imported only when
a runner is made, so `idle-export --help` can list the names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from idle_export.deps import pip_extra
from idle_export.errors import BadInputError, IdleExportError, MissingDependencyError
from idle_export.hardware import gpu_info
from idle_export.runtime.base import Runner

ONNX, ENGINE, MODEL = "onnx", "engine", "model"  # what a runtime runs (Runtime.runs)


@dataclass(frozen=True)
class Runtime:
    name: str
    summary: str  # one line for help texts
    runs: str  # ONNX (a file), ENGINE (a TensorRT engine file) or MODEL (a torch module)
    extra: str | None  # the pip extra that brings it (deps.EXTRAS)
    target: str | None  # the export target (onnx.targets) whose files it runs best
    precisions: tuple[str, ...]  # the model precisions it computes in (ONNX metadata names)
    selection: bool  # its runner can report the kept tokens (Runner.infer's selection_layer*)
    cpu: bool  # computes on the CPU
    make: Callable[..., Runner] = field(repr=False, compare=False, default=None)
    needs: Callable[[], str | None] = field(repr=False, compare=False, default=lambda: None)
    official: bool = False  # runs the authors' code (a clone of their repository)
    # the execution accelerator of Triton's ONNX Runtime backend that runs a file as this runtime
    # does (`serve repo --accelerator`), if any
    triton_accelerator: str | None = None
    # the floating-point precision it computes an FP32 model in unless told otherwise ("f32";
    # OpenVINO: bf16 on CPUs with AMX or AVX-512 BF16): `runner(precision="default")` runs that
    default_precision: Callable[[], str] = field(repr=False, compare=False, default=lambda: "f32")
    # the inference precisions one can ask it to compute an FP32 graph in (check --precision)
    compute_precisions: tuple[str, ...] = ("f32",)
    suffixes: tuple[str, ...] = (".onnx",)  # the model files it reads (ONNX runtimes)

    def unavailable(self) -> str | None:
        """Why it cannot run here (one line), or None when it can."""
        try:
            return self.needs()
        except IdleExportError as e:
            return e.message

    def require(self) -> Runtime:
        """The record, after checking that it runs here (exit 3 with the install hint if not)."""
        why = self.needs()  # a missing package raises its own MissingDependencyError
        if why:
            raise MissingDependencyError(f"the {self.name} runtime cannot run here: {why}", self.install_hint)
        return self

    @property
    def install_hint(self) -> str:
        return pip_extra(self.extra) if self.extra else "see docs/install.md"

    def runner(self, source, *, name: str | None = None, threads: int | None = None,
               selection: bool = False, keep_rate: float | None = None, optimize: bool = False,
               precision: str | None = None) -> Runner:
        """A Runner of `source` (a path for ONNX/ENGINE runtimes, a torch module for MODEL ones).
        `precision`: the runtime's compute precision where it has a choice (OpenVINO: "f32" when
        None, "default" for its own default: bf16 on CPUs with AMX or AVX-512 BF16); `optimize`:
        the passes of the runtime's export target that a file lacks, applied in memory."""
        label = name or (f"{self.name}:{Path(source).name}" if self.runs != MODEL else self.name)
        return self.make(source, name=label, threads=threads, selection=selection, keep_rate=keep_rate,
                         optimize=optimize, precision=precision, target=self.target)


def _module(name: str):
    return importlib.import_module(f"idle_export.runtime.{name}")


def _ort(providers: tuple[str, ...]):
    def make(path, *, name, threads, selection, keep_rate, optimize, precision, target):
        return _module("onnxruntime").OrtRunner(path, name=name, providers=list(providers), threads=threads,
                                                selection=selection, keep_rate=keep_rate, optimize=optimize,
                                                target=target)

    return make


def _ort_needs(provider: str | None, what: str = ""):
    def needs() -> str | None:
        have = _module("onnxruntime").ort_available_providers()  # exit 3 without ONNX Runtime
        if provider and provider not in have:
            return f"ONNX Runtime has no {provider} here (it has {', '.join(have)}): it needs {what}"
        return None

    return needs


def _openvino(path, *, name, threads, selection, keep_rate, optimize, precision, target):
    return _module("openvino").OpenVinoRunner(path, name=name, threads=threads, selection=selection,
                                              keep_rate=keep_rate, optimize=optimize, target=target,
                                              inference_precision=None if precision == "default"
                                              else precision or "f32")


def _openvino_default() -> str:
    return _module("openvino").openvino_default_precision()


def _openvino_needs() -> str | None:
    _module("openvino").import_openvino()  # exit 3 with the extra's hint
    return None


def _tensorrt(path, *, name, threads, selection, keep_rate, optimize, precision, target):
    return _module("tensorrt").TrtRunner(path, name=name, keep_rate=keep_rate)


def _tensorrt_needs() -> str | None:
    if gpu_info() is None:
        return "running a TensorRT engine needs an NVIDIA GPU, and this machine has none"
    return None


def _torch(model, *, name, threads, selection, keep_rate, optimize, precision, target):
    return _module("torch").TorchRunner(model, name=name, selection=selection, threads=threads)


def _official(model, *, name, threads, selection, keep_rate, optimize, precision, target):
    return _module("official").OfficialRunner(model, threads=threads, name=name)


_CPU_EP, _CUDA_EP, _TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("ort", "ONNX Runtime, CPU", ONNX, "cpu", "ort", ("fp32", "int8"), True, True,
            make=_ort((_CPU_EP,)), needs=_ort_needs(None)),
    Runtime("ort-cuda", "ONNX Runtime's CUDA provider, onnxruntime-gpu", ONNX, "gpu", "ort",
            ("fp32", "fp16", "int8"), True, False, make=_ort((_CUDA_EP, _CPU_EP)),
            needs=_ort_needs(_CUDA_EP, "onnxruntime-gpu and an NVIDIA GPU")),
    Runtime("ort-tensorrt", "ONNX Runtime's TensorRT provider, onnxruntime-gpu + TensorRT", ONNX, "gpu",
            "tensorrt", ("fp32", "fp16", "int8"), True, False, make=_ort((_TRT_EP, _CUDA_EP, _CPU_EP)),
            needs=_ort_needs(_TRT_EP, "onnxruntime-gpu, TensorRT's libraries and an NVIDIA GPU"),
            triton_accelerator="tensorrt"),
    Runtime("openvino", "OpenVINO, CPU", ONNX, "openvino", "openvino", ("fp32", "bf16", "int8"), True, True,
            make=_openvino, needs=_openvino_needs, default_precision=_openvino_default,
            triton_accelerator="openvino", compute_precisions=("f32", "bf16", "f16"),
            suffixes=(".onnx", ".xml")),
    Runtime("trt", "a TensorRT engine from idle-export trt, NVIDIA GPU", ENGINE, "trt", "tensorrt",
            ("fp32", "fp16", "int8"), True, False, make=_tensorrt, needs=_tensorrt_needs),
    Runtime("torch", "eager PyTorch from the checkpoint, CPU", MODEL, None, None, ("fp32",), True, True,
            make=_torch),
    Runtime("torch-official", "the authors' IdleViT code from a clone of Ackesnal/IdleViT, CPU", MODEL, None,
            None, ("fp32",), False, True, make=_official, official=True),
)}


# The runtimes the commands pick by role, not by a user's choice: ONNX Runtime on the CPU computes
# the reference of an ONNX file (check --against), `show`'s selections, `serve repo --tune`'s timings
# and the local Triton launcher's sessions; eager PyTorch the reference of a checkpoint; TensorRT
# runs engines.
ORT_CPU, TORCH, ENGINE_RUNTIME = "ort", "torch", "trt"


def for_accelerator(accelerator: str) -> Runtime | None:
    """The runtime that Triton's ONNX Runtime backend with this execution accelerator stands for."""
    return next((r for r in RUNTIMES.values() if r.triton_accelerator == accelerator), None)


def faster_target_here(target: str) -> str | None:
    """A line for `onnx --target TARGET` when another target suits a runtime that computes faster
    on this machine: a CPU runtime whose default precision is not f32 here (OpenVINO in bf16 on
    AMX / AVX-512 BF16, measured faster than FP32 in docs/benchmark.md), when it is installed."""
    for r in RUNTIMES.values():
        if r.runs != ONNX or not r.cpu or r.target == target or r.unavailable():
            continue
        precision = r.default_precision()
        if precision not in ("f32", "fp32"):
            return (f"{r.name} computes in {precision} by default on this CPU, faster than FP32: for it, "
                    f"export with --target {r.target} (docs/benchmark.md, \"Fastest path per CPU\")")
    return None


def names(runs: str | None = None) -> tuple[str, ...]:
    """The runtimes' names, all or those that run `runs` (ONNX, ENGINE, MODEL)."""
    return tuple(n for n, r in RUNTIMES.items() if runs is None or r.runs == runs)


def choices(runs: str | None = None) -> str:
    """'a, b or c': the names for a help or error text."""
    listed = names(runs)
    return listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} or {listed[-1]}"


def described(runs: str | None = None) -> str:
    """'ort (ONNX Runtime, CPU), openvino (OpenVINO, CPU), …': the choices for a --help text."""
    return ", ".join(f"{n} ({RUNTIMES[n].summary})" for n in names(runs))


RUNS_TEXT = {ONNX: "ONNX files", ENGINE: "TensorRT engines", MODEL: "the checkpoint's torch model"}


def get(name: str, *, runs: str | None = None) -> Runtime:
    """The record of `name`; exit 2 naming the choices when it is not one (of those that run
    `runs`)."""
    record = RUNTIMES.get(name)
    if record is None:
        raise BadInputError(f"unknown backend {name!r}", f"use one of {choices(runs)}")
    if runs is not None and record.runs != runs:
        raise BadInputError(f"backend {name!r} runs {RUNS_TEXT[record.runs]}, not {RUNS_TEXT[runs]}",
                            f"use one of {choices(runs)}")
    return record
