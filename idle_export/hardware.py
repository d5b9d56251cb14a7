"""The machine: CPU model, usable cores, the NVIDIA GPU if any (one way to find it), and the
environment a benchmark report records."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from idle_export.errors import BadInputError


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MATRIX_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni",
                "avx512f", "avx2", "fma")  # what the CPU runtimes' GEMMs use, fastest first


def cpu_matrix_features() -> list[str]:
    """The matrix-math features of this CPU (from /proc/cpuinfo), in MATRIX_FLAGS order: benchmarks
    say which ones their figures ran on (AMX bf16/int8 makes bf16 and INT8 several times faster)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                  if line.startswith("flags")), set())
    return [f for f in MATRIX_FLAGS if f in flags]


def environment(threads: int | None) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("idle-export", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "timm",
                 "tensorrt", "tensorrt-rtx-cu13", "openvino", "nncf"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cpu_matrix_features": cpu_matrix_features(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "platform": platform.platform(),
        "load_average_start": load,
        "versions": versions,
        "gpu": (gpu_info() or {}).get("name"),
    }


def gpu_info() -> dict | None:
    """{'name', 'compute_capability' ('sm90')} of the first NVIDIA GPU, or None when there is none.

    The one place that looks for a GPU: nvidia-smi (ships with the driver), so nothing here loads
    CUDA; torch, TensorRT and Polygraphy do that only when an engine really runs."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not rows or len(rows[0]) != 2:
        return None
    name, cc = rows[0]
    return {"name": name, "compute_capability": "sm" + cc.replace(".", "")}


MAX_THREADS = 1024  # the most --threads / threads= a command takes


def check_threads(threads: int | None) -> int | None:
    """`threads` when it is None or 1..MAX_THREADS; BadInputError naming `threads=` otherwise (the
    CLI prints its --threads)."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise BadInputError(f"threads={threads} must be between 1 and {MAX_THREADS}", "e.g. threads=2")
    return threads


def default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def memory_available() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def bytes_per_image(spec) -> int:
    """A rough upper estimate of the memory one image costs while a ViT runs it in FP32: the
    input, a few live [N, 4C] MLP activations and [H, N, N] attention maps (ORT and torch keep
    about this many alive at once)."""
    n = spec.num_patches + 1
    return 4 * (3 * spec.img_size**2 + 4 * n * 4 * spec.embed_dim + 2 * spec.num_heads * n * n)


def check_batch_fits(spec, batch: int, *, what: str = "batch_sizes=", runners: int = 2) -> None:
    """Refuse a batch size whose activations would not fit in this machine's memory (the kernel
    would kill the process), naming the limit and a batch that fits."""
    available = memory_available()
    need = bytes_per_image(spec) * batch * runners
    if available is None or need <= 0.8 * available:
        return
    fits = max(1, int(0.8 * available // (bytes_per_image(spec) * runners)))
    raise BadInputError(f"{what}{batch} needs about {need / 2**30:.0f} GiB of memory for "
                        f"{spec.arch}; this machine has {available / 2**30:.0f} GiB available",
                        f"use {what}{fits} or less")
