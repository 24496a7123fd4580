"""The PyTorch backend of ``rose_prune_`` (the fallback, and the reference of the contract)."""
from __future__ import annotations

from typing import Optional

import torch


def _lines(t, beta: torch.Tensor, n_prune: int, prune: bool, clamp: Optional[float]) -> None:
    """The update on views whose rows are the lines (B is passed transposed)."""
    p, g, imp, mask = t
    current = (p.to(torch.float32) * g.to(torch.float32)).abs()
    imp.copy_(imp * beta + current * (1.0 - beta))  # the kernel's order of operations: bit-identical EMA
    if not prune:
        return
    pruned = torch.sort(imp, dim=1, stable=True).indices[:, :n_prune]
    keep = torch.ones_like(mask)
    keep.scatter_(1, pruned, False)
    mask.copy_(keep)
    p.masked_fill_(~keep, 0)
    if clamp is not None:
        p.clamp_(-clamp, clamp)


def rose_prune_(count: torch.Tensor, ema: float, A, B, n_prune_A: int, n_prune_B: int, prune: bool,
                clamp: Optional[float]) -> None:
    """Every backend's contract: the update of :func:`loranull_kernels.ops.rose_prune.rose_prune_` on validated
    arguments, A and B ``RoseTensors`` or None (not both), ``clamp`` already rounded to the factors' dtype."""
    beta = torch.where(count == 0, 0.0, float(ema)).to(torch.float32)
    if A is not None:
        _lines(A, beta, n_prune_A, prune, clamp)
    if B is not None:
        _lines(B._make(x.t() for x in B), beta, n_prune_B, prune, clamp)
