"""The PyTorch backend of ``null_space`` (the reference of the contract); the CUDA backend
(csrc/nullspace_cuda.cu) runs the same two steps.

:func:`ridged_cholesky` factors ``C + δI`` with the ridge retries; :func:`subspace_ritz` runs the subspace
iteration on ``(C + δI)⁻¹`` from that factor and the Rayleigh–Ritz step. The policy between them (which precision,
when to give up) is the op's, in ``__init__.py``. Both are batched over a leading dim by the same torch.linalg calls
(cuSOLVER / LAPACK).
"""
from __future__ import annotations

import torch


def ridged_cholesky(A: torch.Tensor, delta: torch.Tensor, retries: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Lower Cholesky factors of ``A_b + δ_b I``, each ``δ_b`` raised tenfold until that entry factors.

    Args:
        A: (B, n, n) float32 or float64, symmetric (only its lower triangle is read); shifted in place and restored
            (up to the rounding of adding and subtracting δ), so no n × n temporary besides L.
        delta: (B,) float64, the first ridge of each entry. retries: how many times δ may be raised.
    Returns:
        ``(L, δ)``: L (B, n, n) lower triangular in A's dtype, or None when some entry still failed after
        ``retries`` raises; δ (B,) float64, the ridges used (for an entry that never factored: ten times
        the last one tried).
    """
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    delta = delta.clone()
    for _ in range(retries + 1):
        shift = delta.to(A.dtype)[:, None]
        diag.add_(shift)
        try:
            L, info = torch.linalg.cholesky_ex(A)
        finally:
            diag.sub_(shift)
        failed = info != 0
        if not bool(failed.any()):
            return L, delta
        del L
        delta = torch.where(failed, delta * 10, delta)
    return None, delta


def _inverse_times(L: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ Y`` by two triangular solves: as exact as ``torch.cholesky_solve`` and, measured on the project's
    CPU (MKL, n = 4096, 144 columns), a third faster."""
    return torch.linalg.solve_triangular(L.transpose(-1, -2), torch.linalg.solve_triangular(L, Y, upper=False),
                                         upper=True)


def subspace_ritz(L: torch.Tensor, start: torch.Tensor, k: int, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Subspace iteration on ``(L Lᵀ)⁻¹`` and Rayleigh–Ritz in the last subspace: every backend's contract.

    Args:
        L: (B, n, n) lower Cholesky factor of ``C + δI``, float32 or float64 (the working dtype: the start, the
            iterates and the solves are in it). start: (B, n, l) float64 Gaussian, ``k ≤ l < n``.
        k: Ritz pairs returned. n_iter: solve-and-orthonormalise steps (each: two triangular solves and a QR).
    Returns:
        ``theta (B, k)`` float64 descending, the largest Ritz values of ``(C + δI)⁻¹`` (so ``1/θ − δ`` are C's
        smallest eigenvalues, ascending), and ``vectors (B, n, k)`` float64 orthonormal, theirs.
    """
    Q = start.to(L.dtype)  # a Gaussian block needs no orthonormalising before the first solve
    for _ in range(n_iter):
        Q = torch.linalg.qr(_inverse_times(L, Q)).Q
    # Rayleigh–Ritz on (C + δI)⁻¹ rather than on C: with W = L⁻¹Q, Qᵀ(C + δI)⁻¹Q = WᵀW costs one triangular solve
    # (no n × n product), and it resolves the smallest eigenvalues of C as the largest of the inverse, i.e.
    # relative to themselves, not to ‖C‖ (a float32 product with C would lose them below eps · ‖C‖).
    Q = torch.linalg.qr(Q.double()).Q  # orthonormal to float64 precision: the returned basis
    W = torch.linalg.solve_triangular(L, Q.to(L.dtype), upper=False).double()
    theta, V = torch.linalg.eigh(W.transpose(-1, -2) @ W)  # ascending θ: the last ones are C's smallest
    return theta[..., -k:].flip(-1), Q @ V[..., -k:].flip(-1)
