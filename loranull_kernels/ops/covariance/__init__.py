"""``covariance_update``: ``C += xᵀx`` in place, streaming, float32 accumulation.

Validation and dispatch live here; the work is done by the backend :func:`loranull_kernels.backend.select` picks
among :data:`IMPLEMENTATIONS`: ``triton_backend.py`` (the launcher of ``triton_kernels.py``) or
``torch_backend.py`` (the fallback). The work is registered as a ``torch.library`` custom op that mutates ``C``, so
graph capture sees one opaque in-place op rather than tracing into Triton or BLAS.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import backend
from . import torch_backend, triton_backend

# Backend name -> module with covariance_update(C, x2d, mask), most preferred first (backend.select's order).
IMPLEMENTATIONS = {"triton": triton_backend, "torch": torch_backend}


def _validate(C: torch.Tensor, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"C must be a torch.Tensor, got {type(C).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square (in, in) matrix, got shape {tuple(C.shape)}")
    if C.dtype != torch.float32:
        raise TypeError(f"C must be float32 (covariances accumulate in float32), got {C.dtype}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != C.shape[0]:
        raise ValueError(f"x's last dim must equal C's size {C.shape[0]}, got x of shape {tuple(x.shape)}")
    if x.device != C.device:
        raise ValueError(f"device mismatch: x is on {x.device} but C is on {C.device}")
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            raise TypeError(f"token_mask must be a bool tensor or None, got {type(token_mask).__name__}")
        if token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask must be bool, got {token_mask.dtype}")
        if token_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"token_mask must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(token_mask.shape)}"
            )
        if token_mask.device != x.device:
            raise ValueError(f"device mismatch: token_mask is on {token_mask.device} but x is on {x.device}")


@torch.library.custom_op("loranull::covariance_update", mutates_args=("C",))
def _covariance_update_op(C: torch.Tensor, x: torch.Tensor, token_mask: Optional[torch.Tensor], backend: str) -> None:
    x2d = x.reshape(-1, x.shape[-1])  # a view for every contiguous or row-sliced x: the kernel reads it in place
    mask = token_mask.reshape(-1) if token_mask is not None else None
    IMPLEMENTATIONS[backend].covariance_update(C, x2d, mask)


@_covariance_update_op.register_fake
def _(C, x, token_mask, backend):
    return None


def covariance_update(C: torch.Tensor, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Add ``xᵀx``, summed over every leading dim of ``x``, to ``C`` in place; return ``C``.

    Args:
        C: (in, in) float32, symmetric (as it is when started from zeros and updated only by this function). The
            Triton path reads its upper triangle and writes both halves, so C stays exactly symmetric; the PyTorch
            fallback (one ``addmm_``) updates both halves, symmetric up to float32 rounding.
        x: (..., in) float16, bfloat16, float32 (or float64, via the fallback); same device as C. Not differentiated.
        token_mask: bool, shape ``x.shape[:-1]``, or None. Tokens where it is False are skipped (padding), without
            copying x on the Triton path.
    Returns:
        C, updated: ``C += Σ_t keep_t · x_tᵀ x_t`` with float32 accumulation.
    Raises:
        TypeError: C not float32, x not floating point, token_mask not bool.
        ValueError: C not square, ``x.shape[-1] != C.shape[0]``, token_mask shape, or a device mismatch.
    """
    _validate(C, x, token_mask)
    if x.numel() == 0:  # no token, or K = 0: nothing to add, whichever backend is asked for
        return C
    name = backend.select(x.device, x.dtype, among=tuple(IMPLEMENTATIONS))
    with torch.no_grad():
        _covariance_update_op(C, x.detach(), token_mask, name)
    return C
