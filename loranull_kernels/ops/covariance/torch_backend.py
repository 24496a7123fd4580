"""The PyTorch backend of ``covariance_update`` (the fallback, and the reference of the contract)."""
from __future__ import annotations

import torch

# The fallback casts x to float32 this many elements at a time: fp32 accumulation without a full fp32 copy of x.
_CHUNK_ELEMENTS = 1 << 24


def covariance_update(C: torch.Tensor, x2d: torch.Tensor, mask: torch.Tensor | None) -> None:
    """``C[i, j] += Σ_t keep_t · x[t, i] · x[t, j]``: every backend's contract, on validated inputs.

    Args:
        C: (K, K) float32, symmetric, updated in place. x2d: (T, K) floating point, any strides, T, K ≥ 1.
        mask: (T,) bool, or None (keep every token).
    """
    # One full addmm_ rather than upper-triangle slabs: on an idle CPU the slabs (4 GEMMs + a mirror) were 1.3x
    # faster, but on a shared 2-core machine their extra thread barriers made them 1.5-3x slower than this one call.
    if mask is not None:
        x2d = x2d[mask]  # the fallback copies the kept rows; the Triton kernel reads x in place
    if x2d.dtype == torch.float32:
        C.addmm_(x2d.t(), x2d)
        return
    rows = max(1, _CHUNK_ELEMENTS // max(1, x2d.shape[1]))
    for start in range(0, x2d.shape[0], rows):
        chunk = x2d[start:start + rows].float()
        C.addmm_(chunk.t(), chunk)
