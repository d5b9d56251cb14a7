"""Ahead-of-time compilation of the idle-layer kernels to PTX and cubin (no GPU needed).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))`` runs entirely on the CPU
(LLVM + the ptxas bundled with triton), so engines for sm_80/86/89/90 can be prepared
anywhere. A :class:`KernelBinary` carries what a TensorRT ``aot_impl`` (or any driver-API
launcher) needs: kernel name, PTX, cubin, threads per block and dynamic shared memory.

Launch ABI: the parameters are (input pointers, int32 scalars, output pointers) as declared
in :mod:`.kernels`; triton appends two scratch pointers (global/profile scratch) that these
kernels never use (sizes are checked to be 0), so a launcher may pass null for them. The
kernel is compiled for exactly ``threads`` threads per block (``.reqntid``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .spec import (
    NUM_STAGES,
    TRITON_TYPES,
    check_float_dtype,
    scatter_block_sizes,
    select_block_sizes,
    threads_per_block,
)

SUPPORTED_SM = (80, 86, 89, 90)
MAX_STATIC_SHARED = 48 * 1024  # above this a launcher must opt in to more dynamic smem


@dataclass(frozen=True)
class KernelBinary:
    """One compiled kernel and its launch needs."""

    name: str  # entry point in the PTX/cubin
    sm: int  # compute capability it was compiled for (90 = sm_90/sm_90a)
    ptx: bytes
    cubin: bytes
    num_warps: int
    threads: int  # block_x of every launch (the kernel requires exactly this many)
    shared: int  # dynamic shared memory per block, bytes
    signature: dict = field(default_factory=dict)  # runtime parameter -> triton type
    constexprs: dict = field(default_factory=dict)  # BLOCK_* values baked in
    ptx_version: int = 0  # PTX ISA, e.g. 88 for ".version 8.8"

    @property
    def ptx_target(self) -> str:
        """The ``.target`` of the PTX, e.g. ``sm_90a``."""
        for line in self.ptx.decode(errors="replace").splitlines():
            if line.startswith(".target"):
                return line.split()[1].rstrip(",")
        return ""


def select_signature(xn_dtype: str, x_dtype: str, w_dtype: str) -> dict[str, str]:
    """Triton signature of ``idle_select_kernel`` for the given input dtypes."""
    xn_t, x_t, w_t = (TRITON_TYPES[check_float_dtype(name, d)]
                      for name, d in (("xn", xn_dtype), ("x", x_dtype), ("w", w_dtype)))
    return {"xn_ptr": f"*{xn_t}", "x_ptr": f"*{x_t}", "w_ptr": f"*{w_t}",
            "n_tokens": "i32", "channels": "i32", "k_keep": "i32",
            "idx_ptr": "*i64", "xn_sel_ptr": f"*{xn_t}", "x_sel_ptr": f"*{x_t}"}


def scatter_signature(dtype: str) -> dict[str, str]:
    """Triton signature of ``idle_scatter_kernel`` for x/res/out of the given dtype."""
    t = TRITON_TYPES[check_float_dtype("x", dtype)]
    return {"x_ptr": f"*{t}", "idx_ptr": "*i64", "res_ptr": f"*{t}",
            "n_tokens": "i32", "channels": "i32", "n_sel": "i32", "out_ptr": f"*{t}"}


def _check_sm(sm: int) -> int:
    if not isinstance(sm, int) or isinstance(sm, bool) or sm < 80:
        raise ValueError(f"sm must be a compute capability >= 80 such as {SUPPORTED_SM}, got {sm!r}")
    return sm


def _compile(kernel_name: str, signature: dict, constexprs: dict, sm: int, num_warps: int,
             ptx_version: int | None) -> KernelBinary:
    import triton
    from triton.backends.compiler import GPUTarget

    from . import kernels

    if kernels.interpreting():
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (triton was imported "
                           "in interpreter mode, which has no compiler)")
    fn = getattr(kernels, kernel_name)
    options: dict = {"num_warps": num_warps, "num_stages": NUM_STAGES}
    if ptx_version is not None:
        options["ptx_version"] = int(ptx_version)
    src = triton.compiler.ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=options)
    md = compiled.metadata
    for attr, ok in (("global_scratch_size", 0), ("profile_scratch_size", 0), ("num_ctas", 1),
                     ("launch_cooperative_grid", False), ("launch_pdl", False)):
        if getattr(md, attr, ok) != ok:
            raise RuntimeError(f"{md.name}: {attr}={getattr(md, attr)!r} needs launch support "
                               "that a plain cuLaunchKernel (TensorRT AOT plugin) lacks")
    if md.shared > MAX_STATIC_SHARED:
        raise RuntimeError(f"{md.name} needs {md.shared} B of shared memory (> 48 KiB); "
                           "use smaller blocks")
    ptx = compiled.asm["ptx"]
    version = next((line.split()[1] for line in ptx.splitlines()
                    if line.startswith(".version")), "0.0")
    major, minor = version.split(".")
    return KernelBinary(name=md.name, sm=sm, ptx=ptx.encode(), cubin=bytes(compiled.asm["cubin"]),
                        num_warps=md.num_warps, threads=threads_per_block(md.num_warps),
                        shared=int(md.shared), signature=dict(signature),
                        constexprs=dict(constexprs), ptx_version=int(major) * 10 + int(minor))


@functools.lru_cache(maxsize=64)
def compile_select(sm: int, n: int, c: int, k: int, xn_dtype: str = "float32",
                   x_dtype: str | None = None, w_dtype: str | None = None,
                   ptx_version: int | None = None) -> KernelBinary:
    """The select kernel for N tokens, C channels, K kept patches (x, w default to xn's dtype)."""
    blocks = select_block_sizes(n, c, k)
    sig = select_signature(xn_dtype, x_dtype or xn_dtype, w_dtype or xn_dtype)
    return _compile("idle_select_kernel", sig, blocks.constexprs(), _check_sm(sm),
                    blocks.num_warps, ptx_version)


@functools.lru_cache(maxsize=64)
def compile_scatter(sm: int, n: int, c: int, s: int, dtype: str = "float32",
                    ptx_version: int | None = None) -> KernelBinary:
    """The scatter kernel for x [B, N, C] and S = K+1 selected rows."""
    blocks = scatter_block_sizes(n, c, s)
    return _compile("idle_scatter_kernel", scatter_signature(dtype), blocks.constexprs(),
                    _check_sm(sm), blocks.num_warps, ptx_version)


def compile_kernels(sm: int, *, n: int = 197, c: int = 384, k: int = 137,
                    dtype: str = "float32", ptx_version: int | None = None
                    ) -> dict[str, KernelBinary]:
    """Both kernels for one compute capability and shape: ``{"select": ..., "scatter": ...}``."""
    return {"select": compile_select(sm, n, c, k, dtype, ptx_version=ptx_version),
            "scatter": compile_scatter(sm, n, c, k + 1, dtype, ptx_version=ptx_version)}


def driver_ptx_version() -> int | None:
    """Highest PTX ISA the installed CUDA driver loads (e.g. 88), or None without a driver.

    PTX newer than the driver fails to load at engine run time; pass this as ``ptx_version``.
    """
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
    except (OSError, AttributeError):
        return None
    from triton.backends.nvidia.compiler import ptx_get_version

    return int(ptx_get_version(f"{version.value // 1000}.{version.value % 1000 // 10}"))


def loadable_ptx_version(sm: int) -> int | None:
    """The PTX ISA to compile for so that this machine's driver loads it: the lower of
    triton's default for ``sm`` and :func:`driver_ptx_version`; None (triton's default) when
    there is no driver to ask."""
    driver = driver_ptx_version()
    if driver is None:
        return None
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

    return min(driver, int(ptx_get_version(get_ptxas(_check_sm(sm)).version)))
