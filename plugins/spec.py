"""Shape and dtype rules, validation, block sizes and launch grids of the idle-layer ops.

Pure Python (no numpy/torch/triton/tensorrt import), so the rules are shared by the kernel
wrappers, the AOT compiler and the TensorRT shape descriptors, and tested on their own.
Shape arguments are ints, except that a batch (and, where noted, channel) extent may be any
object supporting ``+``/``*`` (a TensorRT ``ShapeExpr``): such values are passed through
unvalidated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DOMAIN = "idle_export"
OP_SELECT = "IdleSelect"
OP_SCATTER = "IdleScatter"
OP_VERSION = 1

FLOAT_DTYPES = ("float32", "float16")
INDEX_DTYPE = "int64"
MAX_TOKENS = 2048  # the select kernel ranks next_pow2(N) keys held in registers
TILE_ELEMS = 8192  # elements of one register tile (rows x channels)
NUM_STAGES = 1  # no software pipelining: the loops are short and shared memory stays small

_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "int64": "int64", "i64": "int64", "long": "int64",
    "int32": "int32", "i32": "int32", "int": "int32",
}
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "int64": "i64", "int32": "i32"}


def plugin_id(op: str) -> str:
    """TensorRT plugin id ``namespace::name`` of an op, e.g. ``idle_export::IdleSelect``."""
    if op not in (OP_SELECT, OP_SCATTER):
        raise ValueError(f"unknown op {op!r}; expected {OP_SELECT!r} or {OP_SCATTER!r}")
    return f"{DOMAIN}::{op}"


def dtype_name(dtype: Any) -> str:
    """Canonical name of a dtype given as a string, numpy or torch dtype (``torch.float16``)."""
    text = str(getattr(dtype, "name", None) or dtype).lower()
    text = text.removeprefix("torch.")
    try:
        return _ALIASES[text]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}") from None


def check_float_dtype(what: str, dtype: Any) -> str:
    """Canonical name of a float tensor's dtype; ValueError unless float32 or float16."""
    try:
        name = dtype_name(dtype)
    except ValueError:
        name = None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32 or float16, got {dtype}")
    return name


def check_index_dtype(what: str, dtype: Any) -> str:
    """ValueError unless the index tensor's dtype is int64."""
    try:
        name = dtype_name(dtype)
    except ValueError:
        name = None
    if name != INDEX_DTYPE:
        raise ValueError(f"{what} must be int64, got {dtype}")
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_select(b: Any, n: int | None, c: Any, k: int) -> None:
    """ValueError unless xn/x are [B, N, C] with 2 <= N <= MAX_TOKENS and 1 <= K <= N-1.

    ``n=None`` (a dimension not known yet, e.g. symbolic) checks only K >= 1.
    """
    if n is None and _is_int(k):
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        return
    if not _is_int(n) or not _is_int(k):
        raise ValueError(f"N and K must be ints, got N={n!r}, K={k!r}")
    if _is_int(b) and b < 0:
        raise ValueError(f"batch must be >= 0, got {b}")
    if _is_int(c) and c < 1:
        raise ValueError(f"channels must be >= 1, got {c}")
    if not 2 <= n <= MAX_TOKENS:
        raise ValueError(f"N (tokens incl. CLS) must be in [2, {MAX_TOKENS}], got {n}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"K must be in [1, N-1] = [1, {n - 1}], got {k}")


def select_output_shapes(b: Any, n: int | None, c: Any, k: int) -> tuple[tuple, tuple, tuple]:
    """Output shapes of IdleSelect: idx [B, K+1], xn_sel [B, K+1, C], x_sel [B, K+1, C]."""
    validate_select(b, n, c, k)
    return (b, k + 1), (b, k + 1, c), (b, k + 1, c)


def select_output_dtypes(xn: Any, x: Any, w: Any) -> tuple[str, str, str]:
    """Output dtypes of IdleSelect (idx, xn_sel, x_sel) for the input dtypes; validates them."""
    xn_name = check_float_dtype("xn", xn)
    x_name = check_float_dtype("x", x)
    check_float_dtype("w", w)
    return INDEX_DTYPE, xn_name, x_name


def validate_scatter(b: Any, n: int, c: Any, s: int) -> None:
    """ValueError unless x is [B, N, C], idx [B, S], res [B, S, C] with 1 <= S <= N."""
    if not _is_int(n) or not _is_int(s):
        raise ValueError(f"N and S must be ints, got N={n!r}, S={s!r}")
    if _is_int(b) and b < 0:
        raise ValueError(f"batch must be >= 0, got {b}")
    if _is_int(c) and c < 1:
        raise ValueError(f"channels must be >= 1, got {c}")
    if not 1 <= n <= MAX_TOKENS:
        raise ValueError(f"N must be in [1, {MAX_TOKENS}], got {n}")
    if not 1 <= s <= n:
        raise ValueError(f"S (selected rows) must be in [1, N] = [1, {n}], got {s}")


def scatter_output_shape(b: Any, n: int, c: Any, s: int) -> tuple:
    """Output shape of IdleScatter: the shape of x, [B, N, C]."""
    validate_scatter(b, n, c, s)
    return (b, n, c)


def scatter_output_dtype(x: Any, idx: Any, res: Any) -> str:
    """Output dtype of IdleScatter (that of x); res must match x, idx must be int64."""
    x_name = check_float_dtype("x", x)
    res_name = check_float_dtype("res", res)
    check_index_dtype("idx", idx)
    if res_name != x_name:
        raise ValueError(f"res must have the dtype of x ({x_name}), got {res_name}")
    return x_name


def next_pow2(v: int) -> int:
    """Smallest power of two >= v (1 for v <= 1)."""
    if not _is_int(v):
        raise ValueError(f"expected an int, got {v!r}")
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def cdiv(a: Any, b: int) -> Any:
    """Ceiling division (ints only; use the framework's own for symbolic extents)."""
    return -(-a // b)


@dataclass(frozen=True)
class SelectBlocks:
    """Compile-time sizes of the select kernel (Triton constexprs) and its warps."""

    block_n: int  # tokens (>= N), ranked together
    block_c: int  # channels per step of the score loop
    block_i: int  # keys compared with all others per step of the rank loop
    block_g: int  # channels per step of the gather loop
    num_warps: int

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_C": self.block_c,
                "BLOCK_I": self.block_i, "BLOCK_G": self.block_g}


@dataclass(frozen=True)
class ScatterBlocks:
    """Compile-time sizes of the scatter kernel (Triton constexprs) and its warps."""

    block_r: int  # output rows per program
    block_s: int  # selected rows searched per output row (>= S)
    block_c: int  # channels per step
    num_warps: int

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_R": self.block_r, "BLOCK_S": self.block_s, "BLOCK_C": self.block_c}


def _cols(c: int, rows: int, cap: int = 256) -> int:
    """Channel chunk: a power of two <= next_pow2(c), with rows * chunk <= TILE_ELEMS."""
    return max(1, min(next_pow2(c), cap, TILE_ELEMS // rows))


def select_block_sizes(n: int, c: int, k: int) -> SelectBlocks:
    """Block sizes of the select kernel for N tokens, C channels and K kept patches."""
    validate_select(1, n, c, k)
    if not _is_int(c):
        raise ValueError(f"C must be an int to size the blocks, got {c!r}")
    block_n = max(16, next_pow2(n))
    return SelectBlocks(block_n=block_n, block_c=_cols(c, block_n),
                        block_i=min(block_n, TILE_ELEMS // block_n),
                        block_g=_cols(c, block_n), num_warps=4 if block_n <= 256 else 8)


def scatter_block_sizes(n: int, c: int, s: int) -> ScatterBlocks:
    """Block sizes of the scatter kernel for N tokens, C channels and S = K+1 selected rows."""
    validate_scatter(1, n, c, s)
    if not _is_int(c):
        raise ValueError(f"C must be an int to size the blocks, got {c!r}")
    block_s = max(16, next_pow2(s))
    block_r = max(1, min(16, next_pow2(n), 4096 // block_s))
    return ScatterBlocks(block_r=block_r, block_s=block_s, block_c=_cols(c, block_r),
                         num_warps=4)


def select_grid(b: Any) -> tuple:
    """Launch grid of the select kernel: one program per sample."""
    return (b, 1, 1)


def scatter_grid(b: Any, n: int, blocks: ScatterBlocks) -> tuple:
    """Launch grid of the scatter kernel: (sample, block of BLOCK_R output rows)."""
    return (b, cdiv(n, blocks.block_r), 1)


def launch_grid(op: str, b: Any, n: int, c: int, k: int) -> tuple:
    """Grid of either op for xn/x [B, N, C] and K kept patches (S = K+1 scatter rows)."""
    if op == OP_SELECT:
        validate_select(b, n, c, k)
        return select_grid(b)
    if op == OP_SCATTER:
        return scatter_grid(b, n, scatter_block_sizes(n, c, k + 1))
    raise ValueError(f"unknown op {op!r}")


def trt_onnx_attributes(op: str, k: int | None = None) -> dict[str, Any]:
    """Attributes of an ONNX node that TensorRT's parser maps to this op's AOT plugin: node
    op_type = the op name, ``plugin_namespace`` = DOMAIN, ``aot=1`` for the embedded kernel
    (plugin version: the parser's default "1" = OP_VERSION)."""
    attrs: dict[str, Any] = {"plugin_namespace": DOMAIN, "aot": 1}
    if op == OP_SELECT:
        if not _is_int(k) or k < 1:
            raise ValueError(f"{OP_SELECT} needs an int attribute k >= 1, got {k!r}")
        attrs["k"] = k
    elif op != OP_SCATTER or k is not None:
        raise ValueError(f"unknown op {op!r} or unexpected k for {OP_SCATTER}")
    return attrs


def threads_per_block(num_warps: int, warp_size: int = 32) -> int:
    """CUDA block size of a Triton kernel (it is compiled for exactly this many threads)."""
    return num_warps * warp_size
