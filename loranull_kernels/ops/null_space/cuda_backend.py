"""The CUDA backend of ``null_space``: the compiled extension ``loranull_kernels._C`` (csrc/nullspace_cuda.cu),
loaded or JIT-built by :mod:`loranull_kernels._extension`; cuSOLVER batched Cholesky and Householder QRs, cuBLAS
triangular solves, the l × l eigh through ATen."""
from __future__ import annotations

import torch

from ... import _extension


def ridged_cholesky(A: torch.Tensor, delta: torch.Tensor, retries: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`.torch_backend.ridged_cholesky` (the contract) on CUDA tensors, in the extension (A is not modified)."""
    L, delta, ok = _extension.load().nullspace_cholesky(A.contiguous(), delta.contiguous(), retries)
    return (L if ok else None), delta


def subspace_ritz(L: torch.Tensor, start: torch.Tensor, k: int, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.torch_backend.subspace_ritz` (the contract) on CUDA tensors, in the extension."""
    return _extension.load().nullspace_ritz(L.contiguous(), start.contiguous(), k, n_iter)
