"""Triton kernel for the streaming activation covariance ``C += XᵀX`` and its per-GPU launch configurations.

Only the tiles of the upper triangle are computed (half the FLOPs of a full ``XᵀX``); each one is written to both
halves, so ``C`` holds the full symmetric sum after every launch. Products accumulate in float32 whatever the input
dtype; fp32 inputs use IEEE fp32 products (TF32 would round the small eigen-directions the null-space methods live in).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Keyed by a substring of torch.cuda.get_device_name(); the first key found in the name wins, "default" otherwise.
# BLOCK is the square C tile (both dims, so upper tiles pair up with their mirror), BLOCK_T the tokens per step.
# BLOCK_T is given for 2-byte inputs; fp32 inputs halve it so one pipeline stage keeps the same shared-memory size.
CONFIGS: dict[str, dict[str, int]] = {
    "H100": dict(BLOCK=128, BLOCK_T=64, num_warps=8, num_stages=4),
    "H200": dict(BLOCK=128, BLOCK_T=64, num_warps=8, num_stages=4),
    "A100": dict(BLOCK=128, BLOCK_T=32, num_warps=8, num_stages=4),
    "L40": dict(BLOCK=128, BLOCK_T=32, num_warps=8, num_stages=3),
    "default": dict(BLOCK=64, BLOCK_T=32, num_warps=4, num_stages=3),
    # Small tiles so that the odd test shapes span several tiles (diagonal, off-diagonal, ragged edges).
    "interpreter": dict(BLOCK=16, BLOCK_T=16, num_warps=1, num_stages=1),
}


def pick_config(device: torch.device, itemsize: int, interpreting: bool) -> dict[str, int]:
    """The launch configuration for inputs of ``itemsize`` bytes on ``device`` (a copy: callers may edit it)."""
    if interpreting:
        return dict(CONFIGS["interpreter"])
    name = torch.cuda.get_device_name(device)
    key = next((k for k in CONFIGS if k not in ("default", "interpreter") and k in name), "default")
    cfg = dict(CONFIGS[key])
    if itemsize >= 4:
        cfg["BLOCK_T"] = max(16, cfg["BLOCK_T"] // 2)
    return cfg


@functools.lru_cache(maxsize=64)
def _upper_tiles(n_tiles: int, device: torch.device) -> torch.Tensor:
    """(n_tiles·(n_tiles+1)/2, 2) int32 tile coordinates (i, j), i ≤ j, row-major: consecutive programs share
    tile-row i, so its slab of X stays in L2."""
    idx = torch.triu_indices(n_tiles, n_tiles)
    return idx.t().contiguous().to(device=device, dtype=torch.int32)


@triton.jit
def _covariance_upper_kernel(
    C, X, MASK, TILES,
    T, K,
    stride_xt, stride_xk, stride_cm, stride_cn, stride_mask,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    ti = tl.load(TILES + 2 * pid)
    tj = tl.load(TILES + 2 * pid + 1)
    ri = ti * BLOCK + tl.arange(0, BLOCK)
    rj = tj * BLOCK + tl.arange(0, BLOCK)
    in_i = ri < K
    in_j = rj < K
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        keep = t < T
        t64 = t.to(tl.int64)  # T·K can pass 2³¹ elements for a large calibration batch
        if HAS_MASK:
            keep = keep & (tl.load(MASK + t64 * stride_mask, mask=keep, other=0) != 0)
        # Both operands are masked: a dropped token's values are never loaded, so NaN padding cannot leak in.
        a = tl.load(X + t64[None, :] * stride_xt + ri[:, None] * stride_xk, mask=in_i[:, None] & keep[None, :], other=0.0)
        b = tl.load(X + t64[:, None] * stride_xt + rj[None, :] * stride_xk, mask=keep[:, None] & in_j[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot multiplies bf16 bit patterns: hand it fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    # Only elements with row ≤ col are read and written from this tile; the mirror store fills the lower half, so
    # diagonal tiles come out exactly symmetric even when the dot's rounding is not.
    upper = (ri[:, None] <= rj[None, :]) & in_i[:, None] & in_j[None, :]
    c_ptr = C + ri[:, None].to(tl.int64) * stride_cm + rj[None, :] * stride_cn
    new = tl.load(c_ptr, mask=upper, other=0.0) + acc
    tl.store(c_ptr, new, mask=upper)
    ct_ptr = C + rj[:, None].to(tl.int64) * stride_cm + ri[None, :] * stride_cn
    tl.store(ct_ptr, tl.trans(new), mask=tl.trans(upper))


def launch(C: torch.Tensor, x2d: torch.Tensor, mask: torch.Tensor | None, interpreting: bool) -> None:
    """``C[i, j] += Σ_t keep_t · x[t, i] · x[t, j]`` for all i, j (upper tiles computed, mirrored).

    Args:
        C: (K, K) float32, symmetric on entry (its lower triangle is overwritten by the mirror of the upper one).
        x2d: (T, K) float16 / bfloat16 / float32, any strides. mask: (T,) bool or uint8, or None (keep all).
    Inputs are assumed validated (see ``loranull_kernels.ops.covariance``).
    """
    T, K = x2d.shape
    if K > 1 and 0 in C.stride():
        # Programs write disjoint tiles of C; an expanded C aliases them (a write race on a GPU).
        raise ValueError(f"C must not be an expanded view (strides {tuple(C.stride())}): it is updated in place")
    cfg = pick_config(x2d.device, x2d.element_size(), interpreting)
    block = cfg.pop("BLOCK")
    tiles = _upper_tiles(triton.cdiv(K, block), x2d.device)
    if mask is not None:
        mask = mask.view(torch.uint8)  # same bytes, no copy: Triton then sees an integer pointer
    _covariance_upper_kernel[(tiles.shape[0],)](
        C, x2d, mask if mask is not None else x2d, tiles,
        T, K,
        x2d.stride(0), x2d.stride(1), C.stride(0), C.stride(1), mask.stride(0) if mask is not None else 0,
        HAS_MASK=mask is not None, UPCAST=interpreting, IEEE=interpreting or x2d.dtype == torch.float32,
        BLOCK=block, **cfg,
    )
