"""``rsvd``: randomized truncated SVD (Halko–Martinsson–Tropp) with an implicit projection, batched.

Validation, the random test matrix and dispatch live here; the backends (:data:`IMPLEMENTATIONS`) are
``cuda_backend.py``, the CUDA extension (csrc/), on CUDA tensors when it is available, and ``torch_backend.py``
(the same steps) everywhere else or under ``backend.use("torch")``. The test matrix is drawn here for both, so a
seed gives the same answer on either path up to floating-point rounding.
"""
from __future__ import annotations

import torch

from ... import backend
from . import cuda_backend, torch_backend

# Backend name -> module with rsvd(M, omega, Q, rank, n_iter), most preferred first (backend.select's order).
IMPLEMENTATIONS = {"cuda": cuda_backend, "torch": torch_backend}


def default_oversample(rank: int) -> int:
    """Extra sketch columns when none are given: HMT's usual 10, growing with the rank (``max(10, rank // 4)``),
    which with two power iterations keeps the tail-energy error within a few percent of optimal on slowly decaying
    spectra (tests/ops/test_rsvd.py checks 1.05×)."""
    return max(10, rank // 4)


def _validate(M, rank, oversample, n_iter, project_out):
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M must be a torch.Tensor, got {type(M).__name__}")
    if not M.dtype.is_floating_point:
        raise TypeError(f"M must be a floating-point tensor, got {M.dtype}")
    if M.dim() not in (2, 3):
        raise ValueError(f"M must be (m, n) or (batch, m, n), got shape {tuple(M.shape)}")
    m, n = M.shape[-2:]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > min(m, n):
        raise ValueError(f"rank {rank} > min(m, n) = {min(m, n)} for M of shape {tuple(M.shape)}")
    if oversample is not None and (isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0):
        raise ValueError(f"oversample must be a non-negative int or None, got {oversample!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    if project_out is not None:
        if not isinstance(project_out, torch.Tensor):
            raise TypeError(f"project_out must be a tensor or None, got {type(project_out).__name__}")
        if not project_out.dtype.is_floating_point:
            raise TypeError(f"project_out must be a floating-point tensor, got {project_out.dtype}")
        batch = M.shape[:-2]
        ok_batch = project_out.dim() == 2 or (M.dim() == 3 and project_out.dim() == 3 and project_out.shape[0] in (1, M.shape[0]))
        if not ok_batch or project_out.shape[-2] != n or project_out.shape[-1] > n:
            raise ValueError(
                f"project_out must be (n, k) or (batch or 1, n, k) with n = {n}, k ≤ n"
                f"{f' and batch = {batch[0]}' if batch else ''}; got shape {tuple(project_out.shape)}"
            )
        if project_out.device != M.device:
            raise ValueError(f"device mismatch: project_out is on {project_out.device} but M is on {M.device}")


def _test_matrix(batch: int, l: int, n: int, device: torch.device, seed: int | None) -> torch.Tensor:
    """Gaussian (batch, l, n) float32: the transpose of HMT's n × l Ω, in the layout the CUDA extension reads."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
    return torch.randn(batch, l, n, device=device, dtype=torch.float32, generator=gen)


def rsvd(
    M: torch.Tensor,
    rank: int,
    oversample: int | None = None,
    n_iter: int = 2,
    project_out: torch.Tensor | None = None,
    seed: int | None = None,
):
    """Randomized SVD: the top-``rank`` singular triplets of ``M`` or, with ``project_out=Q``, of ``M (I − QQᵀ)``.

    Halko–Martinsson–Tropp: a Gaussian sketch of ``l = min(rank + oversample, m, n)`` columns, ``n_iter`` power
    iterations each re-orthonormalised by QR, then an exact SVD of the small projected matrix. The projection is
    applied as ``X ↦ X − Q(QᵀX)`` inside every product, never formed. Computed in float32 whatever M's dtype.

    Args:
        M: (m, n) or (batch, m, n), any floating dtype, CPU or CUDA.
        rank: number of singular triplets, ``1 ≤ rank ≤ min(m, n)``.
        oversample: extra sketch columns; None for :func:`default_oversample`.
        n_iter: power iterations (2 is enough for the decaying spectra of weights and covariances).
        project_out: Q, (n, k) or (batch or 1, n, k) with orthonormal columns (not checked), or None.
        seed: seed of the test matrix (same seed, device and inputs: same result); None draws from torch's
            global generator.
    Returns:
        ``U (…, m, rank)``, ``S (…, rank)`` descending, ``Vh (…, rank, n)``: float32, on M's device, with
        ``M (I − QQᵀ) ≈ U diag(S) Vh``; ``…`` is the batch dim when M has one.
    Raises:
        TypeError: non-float M or project_out. ValueError: rank > min(m, n) or < 1, bad project_out shape, device
        mismatch, negative oversample or n_iter.
    """
    _validate(M, rank, oversample, n_iter, project_out)
    batched = M.dim() == 3
    M3 = (M if batched else M.unsqueeze(0)).detach().to(torch.float32).contiguous()
    B, m, n = M3.shape
    l = min(rank + (default_oversample(rank) if oversample is None else oversample), m, n)
    Q = None
    if project_out is not None:
        Q = project_out.detach().to(torch.float32)
        Q = (Q if Q.dim() == 3 else Q.unsqueeze(0)).contiguous()
        if Q.shape[-1] == 0:
            Q = None
    omega = _test_matrix(B, l, n, M.device, seed)
    name = backend.select(M3.device, M3.dtype, among=tuple(IMPLEMENTATIONS))
    with torch.no_grad():
        U, S, Vh = IMPLEMENTATIONS[name].rsvd(M3, omega, Q, rank, n_iter)
    if not batched:
        U, S, Vh = U[0], S[0], Vh[0]
    return U, S, Vh
