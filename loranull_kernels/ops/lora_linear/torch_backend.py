"""The PyTorch backend of ``lora_linear``: the fast fallback for CPUs and machines without Triton.

Arrangement (x: (M, K), W: (N, K), A: (r, K), B: (N, r); every M × N / M × K tensor is written once):

forward   H  = drop(x) Aᵀ                         skinny GEMM (+ sparse dropout correction; above p = 0.5 the kept
                                                  entries directly), kept for backward
          Y  = (s·H⊙d) Bᵀ + bias;  Y += x Wᵀ       the big GEMM accumulates into the low-rank product (addmm_)
backward  dG = s · dY B                           once, shared by dX and dA
          dB = s · dYᵀ (H⊙d)
          dX = ((dG⊙d) A) ⊙ keep/(1−p);  dX += dY W
          dA = (dG⊙d)ᵀ drop(x)                    skipped entirely when A is frozen (x is then not even saved)

Masks (RoseLoRA) are applied to the r-sized factors here (cheap copies of A and B); the Triton backend avoids
even those. A quantized base (:class:`.quantized_weight.QuantizedWeight`) is dequantized into a fresh dense matrix in
``forward`` just before the Y GEMM (after H is computed) and again in ``backward`` (only when dX is needed), and
freed when the call returns: the autograd saves the quantized tensors, never the dense copy.
"""
from typing import Optional

import torch

from . import sparse_dropout
from .quantized_weight import dense


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the rank-r intermediates: float32 for half-precision inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _effective(w: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    w = w.to(dtype)
    return w if mask is None else w * mask


def _dropped(seed: torch.Tensor, n_rows: int, n_cols: int, p: float, device: torch.device) -> sparse_dropout.Dropped:
    return sparse_dropout.dropped_entries(int(seed), n_rows, n_cols, p, device)


# Above this p most entries are dropped: ``x Aᵀ − S Aᵀ`` would subtract two nearly equal products (all inputs
# dropped at p = 0.9999 left 3e-2 instead of 0), so the kept entries are multiplied directly (a masked copy of x).
_DENSE_ABOVE = 0.5


def _kept(x: torch.Tensor, dropped: sparse_dropout.Dropped) -> torch.Tensor:
    """x with its dropped entries zeroed (a contiguous copy)."""
    return sparse_dropout.zero_dropped_(x.clone(memory_format=torch.contiguous_format), dropped)


def forward(x, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling, dropout_p):
    """:func:`.autograd.forward_op` (the contract) on this backend; H is in the accumulation dtype."""
    cdt, adt = x.dtype, accumulation_dtype(x.dtype)
    A = _effective(lora_A, mask_A, cdt)
    if dropout_p > _DENSE_ABOVE:
        dropped = _dropped(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        h = (_kept(x, dropped) @ A.t()).to(adt).mul_(1.0 / (1.0 - dropout_p))
    elif dropout_p > 0:
        dropped = _dropped(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        h = (x @ A.t()).to(adt)
        h.sub_(sparse_dropout.rows_product(dropped, x, A.to(adt))).mul_(1.0 / (1.0 - dropout_p))
    else:
        h = (x @ A.t()).to(adt)
    hd = h if rank_scale is None else h * rank_scale.to(adt)
    B = _effective(lora_B, mask_B, cdt)
    weight = dense(weight, cdt)
    if bias is not None:
        y = torch.addmm(bias, hd.to(cdt), B.t(), alpha=scaling)
    else:
        y = torch.mm(hd.to(cdt), B.t()).mul_(scaling) if scaling != 1.0 else torch.mm(hd.to(cdt), B.t())
    y.addmm_(x, weight.t())
    return y, h


def backward(dy, x, weight, lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed, scaling, dropout_p,
             need_dx, need_dA, need_dB, need_drank_scale, need_dbias):
    """:func:`.autograd.backward_op` (the contract) on this backend."""
    cdt, adt = dy.dtype, accumulation_dtype(dy.dtype)
    d = None if rank_scale is None else rank_scale.to(adt)
    hd = h if d is None else h * d
    B = _effective(lora_B, mask_B, cdt)

    dG = (dy @ B).to(adt).mul_(scaling)  # gradient w.r.t. H⊙d
    dB = dy.new_empty(0)
    if need_dB:
        dB = ((hd * scaling).to(cdt).t() @ dy).t()  # as (r × M)(M × N): ~25% faster than dYᵀ(M × r) on CPU BLAS
        if mask_B is not None:
            dB = dB * mask_B
        dB = dB.to(lora_B.dtype).contiguous()
    dd = (dG * h).sum(0).to(rank_scale.dtype) if need_drank_scale else dy.new_empty(0)
    dbias = dy.sum(0) if need_dbias else dy.new_empty(0)

    dx, dA = dy.new_empty(0), dy.new_empty(0)
    if need_dx or need_dA:
        dH = dG if d is None else dG * d
        dropped = None
        if dropout_p > 0:
            dH.mul_(1.0 / (1.0 - dropout_p))  # drop(x) = x ⊙ keep / (1 − p), for both dX and dA
            dropped = _dropped(seed, dy.shape[0], lora_A.shape[1], dropout_p, dy.device)
        if need_dx:
            A = _effective(lora_A, mask_A, cdt)
            dx = dH.to(cdt) @ A
            if dropped is not None:
                sparse_dropout.zero_dropped_(dx, dropped)
            dx.addmm_(dy, dense(weight, cdt))
        if need_dA:
            if dropout_p > _DENSE_ABOVE:
                dA_acc = (dH.t().to(cdt) @ _kept(x, dropped)).to(adt)
            else:
                dA_acc = (dH.t().to(cdt) @ x).to(adt)
                if dropped is not None:
                    dA_acc.sub_(sparse_dropout.cols_product(dropped, x, dH).t())
            if mask_A is not None:
                dA_acc.mul_(mask_A)
            dA = dA_acc.to(lora_A.dtype)
    return dx, dA, dB, dd, dbias


def keep_mask(seed: int, n_rows: int, n_cols: int, p: float, device: torch.device) -> torch.Tensor:
    """The dense bool keep mask this backend draws for ``seed`` (tests and debugging)."""
    return sparse_dropout.keep_mask(seed, n_rows, n_cols, p, device)
