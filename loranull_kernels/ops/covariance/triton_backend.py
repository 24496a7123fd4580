"""The Triton backend of ``covariance_update``: per-GPU launch configurations and the launcher of
:mod:`.triton_kernels` (imported on first launch, so the package imports where Triton cannot)."""
from __future__ import annotations

import functools

import torch

from ... import backend

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


@functools.lru_cache(maxsize=None)
def kernels():
    """The kernel module (imports Triton)."""
    from . import triton_kernels

    return triton_kernels


def covariance_update(C: torch.Tensor, x2d: torch.Tensor, mask: torch.Tensor | None) -> None:
    """:func:`.torch_backend.covariance_update` (the contract) with the upper tiles computed and mirrored: C's lower
    triangle is overwritten by the mirror of its upper one. x2d float16 / bfloat16 / float32; mask may be uint8."""
    T, K = x2d.shape
    if K > 1 and 0 in C.stride():
        # Programs write disjoint tiles of C; an expanded C aliases them (a write race on a GPU).
        raise ValueError(f"C must not be an expanded view (strides {tuple(C.stride())}): it is updated in place")
    interpreting = backend.interpreting()
    cfg = pick_config(x2d.device, x2d.element_size(), interpreting)
    block = cfg.pop("BLOCK")
    tiles = _upper_tiles(-(-K // block), x2d.device)
    if mask is not None:
        mask = mask.view(torch.uint8)  # same bytes, no copy: Triton then sees an integer pointer
    kernels().covariance_upper_kernel[(tiles.shape[0],)](
        C, x2d, mask if mask is not None else x2d, tiles,
        T, K,
        x2d.stride(0), x2d.stride(1), C.stride(0), C.stride(1), mask.stride(0) if mask is not None else 0,
        HAS_MASK=mask is not None, UPCAST=interpreting, IEEE=interpreting or x2d.dtype == torch.float32,
        BLOCK=block, **cfg,
    )
