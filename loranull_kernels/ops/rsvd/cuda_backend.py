"""The CUDA backend of ``rsvd``: the compiled extension ``loranull_kernels._C`` (csrc/), loaded or JIT-built by
:mod:`loranull_kernels._extension`; cuBLAS batched GEMMs and cuSOLVER QRs for the power iterations."""
from __future__ import annotations

import torch

from ... import _extension


def rsvd(M: torch.Tensor, omega: torch.Tensor, Q: torch.Tensor | None, rank: int, n_iter: int):
    """:func:`.torch_backend.rsvd` (the contract) on CUDA tensors, in the extension."""
    return _extension.load().rsvd(M, omega, Q, rank, n_iter)
