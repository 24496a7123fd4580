"""The PyTorch backend of ``null_space`` (the reference of the contract); the CUDA backend
(csrc/nullspace_cuda.cu) runs the same two steps.

:func:`ridged_cholesky` factors ``C + δI`` with the ridge retries (on the CPU through LAPACK in place,
``lapack.py``); :func:`krylov_ritz` runs the block Krylov iteration on ``(C + δI)⁻¹`` from that factor, with a
Rayleigh–Ritz step after each block. The policy between them (which precision, when to give up) is the op's, in
``__init__.py``. Both are batched over a leading dim by the same torch.linalg calls (cuSOLVER / LAPACK).
"""
from __future__ import annotations

import torch

from . import lapack


def ridged_cholesky(A: torch.Tensor, delta: torch.Tensor, retries: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Lower Cholesky factors of ``A_b + δ_b I``, each ``δ_b`` raised tenfold until that entry factors.

    Args:
        A: (B, n, n) float32 or float64, symmetric (only its lower triangle is read): the caller's working copy,
            which this may overwrite. On the CPU (LAPACK's potrf in place, ``lapack.py``) the factors are written
            into A's lower triangle and the returned L *is* A, its strict upper triangle left as it was (every
            consumer reads the lower triangle only): no second n × n buffer and no copy. Elsewhere
            ``torch.linalg.cholesky_ex`` of A shifted in place (and shifted back).
        delta: (B,) float64, the first ridge of each entry. retries: how many times δ may be raised.
    Returns:
        ``(L, δ)``: L (B, n, n) in A's dtype whose lower triangle is the factor, or None when some entry still
        failed after ``retries`` raises (A's content is then undefined); δ (B,) float64, the ridges used (for an
        entry that never factored: ten times the last one tried).
    """
    if lapack.supports(A):
        return _ridged_cholesky_in_place(A, delta, retries)
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


def _ridged_cholesky_in_place(A: torch.Tensor, delta: torch.Tensor, retries: int):
    delta = delta.clone()
    for b in range(A.shape[0]):
        # A failed potrf leaves the entry half overwritten: a retry starts again from a copy, kept only when a
        # retry may come (the float32 attempt of precision="auto" has none: the caller refactors C in float64).
        backup = A[b].clone() if retries else None
        for attempt in range(retries + 1):
            A[b].diagonal().add_(delta[b].to(A.dtype))
            if lapack.potrf_(A[b]) == 0:
                break
            delta[b] *= 10
            if attempt == retries:
                return None, delta
            A[b].copy_(backup)
    return A, delta


def _inverse_times(L: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ Y`` by two triangular solves: as exact as ``torch.cholesky_solve`` and, measured on the project's
    CPU (MKL, n = 4096, 144 columns), a third faster."""
    return torch.linalg.solve_triangular(L.transpose(-1, -2), torch.linalg.solve_triangular(L, Y, upper=False),
                                         upper=True)


def _grow(S: torch.Tensor | None, blocks: list[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of ``[*blocks, new]`` from S, that of ``blocks``: only the products with the new block.
    Appends ``new`` to ``blocks``."""
    corner = new.mT @ new
    if S is not None:
        cross = torch.cat([X.mT @ new for X in blocks], -2)
        corner = torch.cat([torch.cat([S, cross], -1), torch.cat([cross.mT, corner], -1)], -2)
    blocks.append(new)
    return corner


def _ritz(G: torch.Tensor, M: torch.Tensor, vectors: bool):
    """Rayleigh–Ritz in a basis K with Gram matrix ``G = KᵀK`` (≈ I) and ``M = Kᵀ(C + δI)⁻¹K``: the generalized
    problem ``M v = θ G v`` (so a basis orthonormal only to the working precision loses nothing more), in G's dtype.
    Returns θ ascending and, when ``vectors``, the coefficients ``V`` with ``VᵀGV = I`` (else None)."""
    R, info = torch.linalg.cholesky_ex(G)
    if bool((info != 0).any()):  # a degenerate basis (an exhausted Krylov space): drop its null directions
        s, U = torch.linalg.eigh(G)
        keep = s > s[..., -1:] * 1e-10
        T = U * torch.where(keep, s.clamp_min(torch.finfo(G.dtype).tiny).rsqrt(), torch.zeros_like(s)).unsqueeze(-2)
    else:
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        T = torch.linalg.solve_triangular(R.mT, eye, upper=True)  # R⁻ᵀ: TᵀGT = I
    P = T.mT @ M @ T
    P = (P + P.mT) / 2
    if not vectors:
        return torch.linalg.eigvalsh(P), None
    theta, U = torch.linalg.eigh(P)
    return theta, T @ U


def krylov_ritz(L: torch.Tensor, start: torch.Tensor, k: int, max_blocks: int,
                tol: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block Krylov iteration on ``(L Lᵀ)⁻¹`` with Rayleigh–Ritz after every block, stopped when the Ritz estimate
    of the k smallest eigenvalues has converged: every backend's contract.

    The basis grows by one block of b columns per step: ``Q₁ = orth((C + δI)⁻¹ Ω)``, ``Q_{i+1} = orth((C + δI)⁻¹
    Q_i)`` after removing its components along the earlier blocks (classical Gram–Schmidt, twice). Rayleigh–Ritz
    is on ``(C + δI)⁻¹`` in ``K = [Q₁ … Q_q]``: with ``W = L⁻¹K``, ``Kᵀ(C + δI)⁻¹K = WᵀW``, and ``L⁻¹Q_i`` is the
    first half of the solve that makes the next block, so the Ritz steps cost one extra triangular solve in all
    (on the last block). It resolves C's smallest eigenvalues as the largest of the inverse, relative to
    themselves rather than to ‖C‖ (a product with C would lose them below eps · ‖C‖).

    Precision: ``KᵀK`` and ``WᵀW`` are products in the working dtype, grown a block at a time, and the small
    Ritz problem is solved in it too. W itself carries the working dtype's rounding (a float32 triangular solve),
    so float64 products and eigensolves of it would add digits it does not have, at about twice the time
    (measured: 30 ms of 400 at n = 4096, b = 144, 3 blocks). The returned vectors are made orthonormal in float64
    (one Cholesky–QR pass).

    Args:
        L: (B, n, n) whose lower triangle is the Cholesky factor of ``C + δI`` (the strict upper triangle is not
            read), float32 or float64: the working dtype of the solves.
        start: (B, n, b) Gaussian in L's dtype. k: Ritz pairs returned, ``k ≤ b``.
        max_blocks: at most this many blocks (and at most ⌈n / b⌉: a last block that would overflow n is cut to
            the dimensions left, and the basis then spans the whole space). tol: stop after block q ≥ 2 when
            ``Σ 1/θ`` over the top k (the Ritz estimate of ``Σ (λ_i + δ)`` over C's k smallest) fell by at most
            ``tol`` (relative) since block q − 1, for every matrix of the batch; 0 runs all blocks.
    Returns:
        ``theta (B, k)`` float64 descending (``1/θ − δ`` are C's smallest eigenvalues, ascending),
        ``vectors (B, n, k)`` float64 orthonormal, and the number of blocks used.
    """
    n, b = start.shape[-2:]
    max_blocks = max(1, min(max_blocks, -(-n // b)))
    width = 0  # the basis size so far
    Y = _inverse_times(L, start)
    blocks: list[torch.Tensor] = []  # the basis K, working dtype
    solved: list[torch.Tensor] = []  # W = L⁻¹K, block by block
    G = M = V = None
    previous = None
    for q in range(1, max_blocks + 1):
        if blocks:
            K = torch.cat(blocks, -1)
            for _ in range(2):
                Y = torch.baddbmm(Y, K, K.mT @ Y, alpha=-1)
        Q = torch.linalg.qr(Y).Q[..., :n - width]
        width += Q.shape[-1]
        Z = torch.linalg.solve_triangular(L, Q, upper=False)
        G = _grow(G, blocks, Q)
        M = _grow(M, solved, Z)
        last = q == max_blocks
        if tol > 0 and not last:
            # From the second block on with the vectors: when the test stops the iteration they are the answer.
            theta, V = _ritz(G, M, vectors=q >= 2)
            energy = (1.0 / theta[..., -k:].double()).sum(-1)
            if previous is not None and bool(((previous - energy) <= tol * energy).all()):
                break
            previous = energy
        else:
            V = None
        if not last:
            Y = torch.linalg.solve_triangular(L.mT, Z, upper=True)
    if V is None:
        theta, V = _ritz(G, M, vectors=True)
    V = V[..., -k:].flip(-1)
    offsets = [0]
    for X in blocks:
        offsets.append(offsets[-1] + X.shape[-1])
    vectors = sum(X @ V[..., o:o + X.shape[-1], :] for X, o in zip(blocks, offsets)).double()
    R = torch.linalg.cholesky(vectors.mT @ vectors, upper=True)  # ≈ I: orthonormal to float64 precision
    return theta[..., -k:].flip(-1).double(), torch.linalg.solve_triangular(R, vectors, upper=True, left=False), q
