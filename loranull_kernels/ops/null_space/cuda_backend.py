"""The CUDA backend of ``null_space``: the compiled extension ``loranull_kernels._C`` (csrc/nullspace_cuda.cu),
loaded or JIT-built by :mod:`loranull_kernels._extension`; cuSOLVER batched Cholesky and Householder QRs, cuBLAS
triangular solves, and ATen for the block products and the small Rayleigh–Ritz problems."""
from __future__ import annotations

import torch

from ... import _extension


def ridged_cholesky(A: torch.Tensor, delta: torch.Tensor, retries: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`.torch_backend.ridged_cholesky` (the contract) on CUDA tensors, in the extension (A is not modified)."""
    L, delta, ok = _extension.load().nullspace_cholesky(A.contiguous(), delta.contiguous(), retries)
    return (L if ok else None), delta


def krylov_ritz(L: torch.Tensor, start: torch.Tensor, k: int, max_blocks: int,
                tol: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`.torch_backend.krylov_ritz` (the contract) on CUDA tensors, in the extension."""
    theta, vectors, blocks = _extension.load().nullspace_krylov(L.contiguous(), start.contiguous(), k, max_blocks,
                                                                tol)
    return theta, vectors, int(blocks)
