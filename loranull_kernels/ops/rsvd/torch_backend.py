"""The PyTorch backend of ``rsvd`` (the reference of the contract); the CUDA backend (csrc/rsvd_cuda.cu) runs the
same steps.

Halko, Martinsson & Tropp (2011), Algorithms 4.4 (randomized subspace iteration) and 5.1, on the operator
``A = M P`` with ``P = I − QQᵀ`` applied as ``X ↦ X − Q(QᵀX)``: ``M P`` is never formed.
"""
from __future__ import annotations

import torch


def _project(X: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """``(I − QQᵀ) X``. X (B, n, l); Q (1 or B, n, k) with orthonormal columns, or None."""
    if Q is None:
        return X
    return X - Q @ (Q.transpose(-1, -2) @ X)


def _orth(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(X, mode="reduced").Q


def rsvd(M: torch.Tensor, omega: torch.Tensor, Q: torch.Tensor | None, rank: int, n_iter: int):
    """Randomized SVD of ``M (I − QQᵀ)`` from a given Gaussian test matrix: every backend's contract.

    Args:
        M: (B, m, n) float32. omega: (B, l, n) float32, the transposed test matrix (the layout the CUDA extension
            reads as a column-major n × l matrix), ``rank ≤ l ≤ min(m, n)``. Q: (1 or B, n, k) float32 or None.
        rank: number of singular triplets returned. n_iter: power (subspace) iterations, each re-orthonormalised.
    Returns:
        U (B, m, rank), S (B, rank) descending, Vh (B, rank, n), all float32.
    """
    Mt = M.transpose(-1, -2)
    Y = _orth(M @ _project(omega.transpose(-1, -2), Q))  # (B, m, l): orthonormal basis of range(A Ω)
    for _ in range(n_iter):
        Z = _orth(_project(Mt @ Y, Q))  # (B, n, l)
        Y = _orth(M @ _project(Z, Q))
    # B = Yᵀ A = Zᵀ with Z = Aᵀ Y (n × l). Z = Q_Z R gives B = Rᵀ Q_Zᵀ: only the l × l matrix Rᵀ needs an SVD.
    Z = _project(Mt @ Y, Q)
    Qz, R = torch.linalg.qr(Z, mode="reduced")
    Ub, S, Vbh = torch.linalg.svd(R.transpose(-1, -2), full_matrices=False)
    U = Y @ Ub[..., :rank]
    Vh = Vbh[..., :rank, :] @ Qz.transpose(-1, -2)
    return U, S[..., :rank].contiguous(), Vh
