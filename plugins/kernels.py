"""Triton kernels of the idle-layer ops and their torch launch wrappers.

Kernel parameters follow the TensorRT AOT plugin convention: input pointers, then int32
scalars, then output pointers (then the constexpr block sizes), so the same kernels serve the
torch wrappers here and the PTX embedded by :mod:`.tensorrt_plugin`. Tensors are contiguous.

Select (one program per sample): the scores ``xn_j · w`` (fp32 accumulation) are mapped to
distinct int64 keys ``monotone(score) << 32 | (2^31 - 1 - j)``, which order the tokens by
score and, on equal scores, by lower index; CLS gets the largest key (always first), padding
the smallest. Each token's output position is its rank (the number of larger keys, counted
BLOCK_I keys at a time: O(N^2) compares, no sort); tokens of rank <= K write their index to
``idx[b, rank]`` and copy their xn and x rows to row ``rank`` of xn_sel and x_sel.
NaN scores rank above every number (as torch.topk does); -0.0 ties +0.0.

Scatter (one program per BLOCK_R output rows of a sample): each output row looks itself up in
``idx`` (the last occurrence wins) and copies that row of ``res``, or its own row of x. Every
output element is written exactly once, so no ordering between programs is needed; indices
outside [0, N) are ignored.

On CPU tensors the wrappers need ``TRITON_INTERPRET=1`` set before triton is imported.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import triton
import triton.language as tl

from .spec import (
    NUM_STAGES,
    scatter_block_sizes,
    scatter_grid,
    scatter_output_dtype,
    select_block_sizes,
    select_grid,
    select_output_dtypes,
    select_output_shapes,
    validate_scatter,
)

if TYPE_CHECKING:
    import torch

LOW_MAX = tl.constexpr(0x7FFFFFFF)  # low word of a patch key: LOW_MAX - token
CLS_KEY = tl.constexpr(0x7FFFFFFF7FFFFFFF)  # above every patch key
PAD_MONO = tl.constexpr(-0x80000000)  # below every score (NaN and -inf included)


@triton.jit
def idle_select_kernel(xn_ptr, x_ptr, w_ptr, n_tokens, channels, k_keep,
                       idx_ptr, xn_sel_ptr, x_sel_ptr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr):
    """Scores, top-K with CLS first, idx [B, K+1] and the gathers of xn and x rows."""
    b = tl.program_id(0).to(tl.int64)
    n_keep = k_keep + 1
    in_base = b * n_tokens * channels
    tok = tl.arange(0, BLOCK_N)
    is_token = tok < n_tokens
    is_patch = (tok >= 1) & is_token

    score = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        tile = tl.load(xn_ptr + in_base + tok[:, None] * channels + cols[None, :],
                       mask=is_patch[:, None] & col_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + b * channels + cols, mask=col_ok, other=0.0)
        score += tl.sum(tile.to(tl.float32) * wv.to(tl.float32)[None, :], axis=1)

    # order-preserving int32 image of the float score (sign-magnitude -> two's complement)
    bits = score.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & LOW_MAX)
    mono = tl.where(score == 0.0, 0, mono)
    mono = tl.where(score != score, LOW_MAX, mono)
    mono = tl.where(is_patch, mono, PAD_MONO)
    low = tl.where(is_patch, LOW_MAX - tok, 0)
    key = (mono.to(tl.int64) << 32) | low.to(tl.int64)
    key = tl.where(tok == 0, CLS_KEY, key)

    # rank = number of larger keys: a permutation of 0..N-1 (keys of tokens are distinct)
    rank = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i0 in range(0, n_tokens, BLOCK_I):
        key_i = tl.gather(key, i0 + tl.arange(0, BLOCK_I), 0)
        rank += tl.sum((key_i[:, None] > key[None, :]).to(tl.int32), axis=0)
    keep = (rank < n_keep) & is_token
    tl.store(idx_ptr + b * n_keep + rank, tok.to(tl.int64), mask=keep)

    src_row = in_base + tok * channels
    dst_row = (b * n_keep + rank) * channels
    for c0 in range(0, channels, BLOCK_G):
        cols = c0 + tl.arange(0, BLOCK_G)
        m = keep[:, None] & (cols < channels)[None, :]
        src = src_row[:, None] + cols[None, :]
        dst = dst_row[:, None] + cols[None, :]
        tl.store(xn_sel_ptr + dst, tl.load(xn_ptr + src, mask=m), mask=m)
        tl.store(x_sel_ptr + dst, tl.load(x_ptr + src, mask=m), mask=m)


@triton.jit
def idle_scatter_kernel(x_ptr, idx_ptr, res_ptr, n_tokens, channels, n_sel, out_ptr,
                        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, r] = res[b, p] where idx[b, p] == r (last p), else x[b, r]."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_tokens
    pos = tl.arange(0, BLOCK_S)
    sel = tl.load(idx_ptr + b * n_sel + pos, mask=pos < n_sel, other=-1)
    hit = sel[None, :] == rows.to(tl.int64)[:, None]
    src_pos = tl.max(tl.where(hit, pos[None, :], -1), axis=1)
    from_res = src_pos >= 0
    from_x = src_pos < 0

    x_row = (b * n_tokens + rows) * channels
    r_row = (b * n_sel + src_pos) * channels
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = row_ok[:, None] & (cols < channels)[None, :]
        xv = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=m & from_x[:, None])
        rv = tl.load(res_ptr + r_row[:, None] + cols[None, :], mask=m & from_res[:, None])
        tl.store(out_ptr + x_row[:, None] + cols[None, :],
                 tl.where(from_res[:, None], rv, xv), mask=m)


def interpreting() -> bool:
    """True when triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _check_devices(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"tensors on {device} need TRITON_INTERPRET=1 (set before importing "
                         "triton); the compiled kernels run on CUDA tensors")


def idle_select(xn: torch.Tensor, x: torch.Tensor, w: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused IdleSelect: (idx int64 [B, K+1] CLS first, xn_sel [B, K+1, C], x_sel [B, K+1, C]).

    xn, x: [B, N, C] (float32/float16), w: [B, C] the folded CLS query ``q_cls @ Wk``.
    """
    import torch

    if xn.dim() != 3 or tuple(x.shape) != tuple(xn.shape) or w.dim() != 2 \
            or tuple(w.shape) != (xn.shape[0], xn.shape[2]):
        raise ValueError(f"expected xn, x [B, N, C] and w [B, C]; got {tuple(xn.shape)}, "
                         f"{tuple(x.shape)}, {tuple(w.shape)}")
    _check_devices(xn, x, w)
    b, n, c = (int(v) for v in xn.shape)
    k = int(k)
    idx_shape, xn_sel_shape, x_sel_shape = select_output_shapes(b, n, c, k)
    select_output_dtypes(xn.dtype, x.dtype, w.dtype)
    xn, x, w = xn.contiguous(), x.contiguous(), w.contiguous()
    idx = torch.empty(idx_shape, dtype=torch.int64, device=xn.device)
    xn_sel = torch.empty(xn_sel_shape, dtype=xn.dtype, device=xn.device)
    x_sel = torch.empty(x_sel_shape, dtype=x.dtype, device=xn.device)
    if b == 0:
        return idx, xn_sel, x_sel
    blocks = select_block_sizes(n, c, k)
    idle_select_kernel[select_grid(b)](xn, x, w, n, c, k, idx, xn_sel, x_sel,
                                       **blocks.constexprs(), num_warps=blocks.num_warps,
                                       num_stages=NUM_STAGES)
    return idx, xn_sel, x_sel


def idle_scatter(x: torch.Tensor, idx: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """Fused IdleScatter: a new tensor equal to x with rows ``idx[b]`` replaced by ``res[b]``.

    x: [B, N, C], idx: int64 [B, S], res: [B, S, C] in the dtype of x.
    """
    import torch

    if x.dim() != 3 or idx.dim() != 2 or res.dim() != 3 or idx.shape[0] != x.shape[0] \
            or tuple(res.shape) != (idx.shape[0], idx.shape[1], x.shape[2]):
        raise ValueError(f"expected x [B, N, C], idx [B, S], res [B, S, C]; got "
                         f"{tuple(x.shape)}, {tuple(idx.shape)}, {tuple(res.shape)}")
    _check_devices(x, idx, res)
    b, n, c = (int(v) for v in x.shape)
    s = int(idx.shape[1])
    validate_scatter(b, n, c, s)
    scatter_output_dtype(x.dtype, idx.dtype, res.dtype)
    x, idx, res = x.contiguous(), idx.contiguous(), res.contiguous()
    out = torch.empty_like(x)
    if b == 0:
        return out
    blocks = scatter_block_sizes(n, c, s)
    idle_scatter_kernel[scatter_grid(b, n, blocks)](x, idx, res, n, c, s, out,
                                                    **blocks.constexprs(),
                                                    num_warps=blocks.num_warps,
                                                    num_stages=NUM_STAGES)
    return out
