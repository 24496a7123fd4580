"""Null-space helpers of the activation-aware methods (LoRA-Null, ../shared/METHODS.md).

- :func:`eigh_ascending` / :func:`smallest_eigenvectors`: the eigenbasis of a covariance and its "null space", the
  directions the calibration activations barely use;
- :func:`row_space_basis`: an orthonormal basis of an adapter's input subspace (the row space of A);
- :func:`energy_fraction` ``tr(QᵀCQ) / tr(C)`` and :func:`leak` ``‖X Q_A‖²_F / ‖X‖²_F``: how much activation
  energy falls inside a subspace. Both are scale-free: a random r-dim subspace of ``in`` dims gets about ``r / in``.

Decompositions run in float32 or float64 whatever the input dtype (never in half precision: the null space lives
where half-precision rounding dominates).
"""
from __future__ import annotations

import torch

_EIGH_DTYPES = (torch.float32, torch.float64)


def _check_covariance(C: torch.Tensor, name: str = "C") -> None:
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(C).__name__}")
    if not C.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {C.dtype}")
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"{name} must be a square (in, in) matrix, got shape {tuple(C.shape)}")


def eigh_ascending(C: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of the symmetric ``C``, eigenvalues ascending.

    Args:
        C: (in, in) symmetric (only its lower triangle is read), any float dtype.
        dtype: float32 or float64, the precision of the decomposition.
    Returns:
        ``eigenvalues (in,)`` ascending and ``eigenvectors (in, in)`` (column i belongs to eigenvalue i), in ``dtype``.
    Raises:
        ValueError: C not square, non-finite entries, or dtype not float32/float64.
    """
    _check_covariance(C)
    if dtype not in _EIGH_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    A = C.detach().to(dtype)
    if not torch.isfinite(A).all():
        raise ValueError("C has non-finite entries")
    return torch.linalg.eigh(A)  # LAPACK / cuSOLVER syevd: ascending already


def smallest_eigenvectors(C: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The null-space basis of LoRA-Null: eigenvectors of the ``k`` smallest eigenvalues of ``C``.

    Args:
        C: (in, in) symmetric covariance. k: ``1 ≤ k ≤ in``. dtype: float32 or float64 (see :func:`eigh_ascending`).
    Returns:
        ``eigenvalues (k,)`` ascending and ``Q (in, k)`` with orthonormal columns, in ``dtype``.
    """
    _check_covariance(C)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= C.shape[0]:
        raise ValueError(f"k must be an int in [1, {C.shape[0]}], got {k!r}")
    values, vectors = eigh_ascending(C, dtype)
    return values[:k], vectors[:, :k]


def row_space_basis(A: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """An orthonormal basis ``Q_A (in, r')`` of the row space of ``A (r, in)``, in float32 (float64 for float64 A).

    Directions with singular value ≤ ``rtol · σ_max`` are dropped (default ``max(r, in) · eps`` of the dtype), so a
    rank-deficient A gives ``r' < r`` and an all-zero A an empty ``(in, 0)`` basis.
    """
    if not isinstance(A, torch.Tensor) or not A.dtype.is_floating_point or A.dim() != 2:
        raise ValueError(f"A must be a floating-point (r, in) matrix, got {getattr(A, 'shape', type(A).__name__)}")
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    _, S, Vh = torch.linalg.svd(A.detach().to(dtype), full_matrices=False)
    if rtol is None:
        rtol = max(A.shape) * torch.finfo(dtype).eps
    keep = S > rtol * S.max() if S.numel() and S.max() > 0 else torch.zeros_like(S, dtype=torch.bool)
    return Vh[keep].t()


def energy_fraction(C: torch.Tensor, Q: torch.Tensor) -> float:
    """``tr(Qᵀ C Q) / tr(C)``: the fraction of the activation energy that lies in ``span(Q)``.

    Args:
        C: (in, in) uncentred covariance (any scale). Q: (in, k) with orthonormal columns.
    Returns:
        A float in [0, 1] (up to rounding).
    """
    _check_covariance(C)
    if not isinstance(Q, torch.Tensor) or Q.dim() != 2 or Q.shape[0] != C.shape[0]:
        raise ValueError(f"Q must be ({C.shape[0]}, k), got {getattr(Q, 'shape', type(Q).__name__)}")
    dtype = torch.float64 if C.dtype == torch.float64 else torch.float32
    Cd, Qd = C.detach().to(dtype), Q.detach().to(device=C.device, dtype=dtype)
    total = torch.diagonal(Cd).sum()
    if total <= 0:
        raise ValueError("tr(C) must be positive (an empty or all-zero calibration set?)")
    return ((Cd @ Qd) * Qd).sum().item() / total.item()


def leak(X: torch.Tensor, A: torch.Tensor) -> float:
    """The leak of METHODS.md: ``‖X Q_A‖²_F / ‖X‖²_F``, the share of the energy of activations ``X`` that an
    adapter with down-projection ``A`` sees, ``Q_A`` an orthonormal basis of A's row space.

    Args:
        X: (..., in) held-out activations. A: (r, in) the adapter's down-projection (lora_A).
    Returns:
        A float in [0, 1]: about ``r / in`` for a random A, near 0 for a LoRA-Null A on knowledge-like X.
    """
    if not isinstance(X, torch.Tensor) or not X.dtype.is_floating_point or X.dim() < 1:
        raise ValueError("X must be a floating-point (..., in) tensor")
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[1] != X.shape[-1]:
        raise ValueError(f"A must be (r, {X.shape[-1]}), got {getattr(A, 'shape', type(A).__name__)}")
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    X2 = X.detach().reshape(-1, X.shape[-1]).to(dtype)
    total = (X2 * X2).sum()
    if total <= 0:
        raise ValueError("X has no energy (all zeros or empty)")
    Q_A = row_space_basis(A.to(X2.device)).to(dtype)
    return ((X2 @ Q_A) ** 2).sum().item() / total.item()
