"""``null_space``: the k smallest eigenpairs of symmetric positive semi-definite matrices by randomized subspace
iteration on the inverse, batched over same-shape matrices (the solver of :func:`loranull_kernels.nullspace.
randomized_smallest`, which documents the method; docs/design.md, "The other ops").

Validation, the working copy, the precision policy (float32 first, float64 when float32 needs a larger ridge or
n > :data:`AUTO_FLOAT32_UP_TO`), the random start and dispatch live here; the backends (:data:`IMPLEMENTATIONS`)
each provide the two steps ``ridged_cholesky`` and ``krylov_ritz``: ``cuda_backend.py``, the CUDA extension
(csrc/nullspace_cuda.cu), on CUDA tensors when it is available, and ``torch_backend.py`` (the contract) everywhere else or under
``backend.use("torch")``. The start is drawn here for both, so a seed gives the same answer on either path up to
floating-point rounding.
"""
from __future__ import annotations

import operator

import torch

from ... import backend
from . import cuda_backend, torch_backend

# Backend name -> module with ridged_cholesky and krylov_ritz, most preferred first (backend.select's order).
IMPLEMENTATIONS = {"cuda": cuda_backend, "torch": torch_backend}
PRECISIONS = ("auto", "float32", "float64")
# How many times the ridge may be raised tenfold before C counts as far from PSD.
RIDGE_RETRIES = 6
# precision="auto" tries float32 only up to this size. A float32 Cholesky's rounding error grows with n (its
# backward error is up to ~n · eps₃₂ · ‖C‖): on the project's CPU a heavy-tailed n = 11008 covariance (22,016
# tokens) failed in float32 at the first ridge after 2.4 s, and the float64 factorisation then took the rest of the
# 11 s (8.0 s when float64 is the first try); at n = 4096 (8,192 tokens) and on real activations float32 factored.
AUTO_FLOAT32_UP_TO = 8192


def _validate(C, k, oversample, n_iter, tol, precision) -> tuple[int, int, int]:
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"C must be a torch.Tensor, got {type(C).__name__}")
    if not C.dtype.is_floating_point:
        raise TypeError(f"C must be floating point, got {C.dtype}")
    if C.dim() not in (2, 3) or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"C must be (n, n) or (batch, n, n), got shape {tuple(C.shape)}")
    n = C.shape[-1]
    try:
        k, oversample, n_iter = (operator.index(v) for v in (k, oversample, n_iter))
    except TypeError:
        raise TypeError(f"k, oversample and n_iter must be ints, got {k!r}, {oversample!r}, {n_iter!r}") from None
    if k < 1 or oversample < 0 or k + oversample >= n or n_iter < 1:
        raise ValueError(f"need 1 ≤ k, oversample ≥ 0, k + oversample < n = {n} and n_iter ≥ 1; got k={k}, "
                         f"oversample={oversample}, n_iter={n_iter}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a real number ≥ 0, got {tol!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return k, oversample, n_iter


def working_copy(C: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous (B, n, n) copy of C in ``dtype``, which the solver may overwrite."""
    A = C.detach().to(dtype, copy=True, memory_format=torch.contiguous_format)
    return A if C.dim() == 3 else A.unsqueeze(0)


def implementation(t: torch.Tensor):
    """The backend module that runs on tensors like ``t`` (:func:`loranull_kernels.backend.select`)."""
    return IMPLEMENTATIONS[backend.select(t.device, t.dtype, among=tuple(IMPLEMENTATIONS))]


def smallest_eigenpairs(C: torch.Tensor, k: int, *, oversample: int, n_iter: int, tol: float, seed: int | None,
                        ridge: float, precision: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The k smallest eigenpairs of the symmetric PSD ``C`` (of each matrix of a batch).

    Args:
        C: (n, n) or (B, n, n), any float dtype, CPU or CUDA; only the lower triangle enters the factorisation.
        k: ``1 ≤ k``, ``k + oversample < n``. oversample: extra columns of each Krylov block (b = k + oversample).
        n_iter: ``≥ 1``, the most Krylov blocks. tol: ``≥ 0``, the convergence test between blocks (0: run n_iter).
        seed: of the Gaussian start (None: torch's global generator). ridge: the first δ relative to tr(C)/n,
            raised tenfold up to :data:`RIDGE_RETRIES` times. precision: ``"auto"`` (float32 when its factorisation
            succeeds at the first ridge, else float64; float64 for float64 C and above :data:`AUTO_FLOAT32_UP_TO`),
            ``"float32"`` or ``"float64"``.
    Returns:
        ``values (…, k)`` ascending and ``vectors (…, n, k)`` orthonormal, float64, on C's device, and the number
        of Krylov blocks used.
    Raises:
        TypeError / ValueError: bad arguments, non-finite C, ``tr(C) ≤ 0``, or C not factorable with the largest
        ridge (far from PSD).
    """
    k, oversample, n_iter = _validate(C, k, oversample, n_iter, tol, precision)
    batched = C.dim() == 3
    n, l = C.shape[-1], k + oversample
    use_float64 = precision == "float64" or (precision == "auto" and (C.dtype == torch.float64
                                                                        or n > AUTO_FLOAT32_UP_TO))
    first = torch.float64 if use_float64 else torch.float32
    # The Cholesky reads A's lower triangle only, and the Ritz matrix is symmetrised: A need not be exactly
    # symmetric. A copy also of an input in the working dtype: the backends may factor it in place.
    A = working_copy(C, first)
    # NaN / Inf anywhere make the sum non-finite: one cheap pass instead of isfinite's four (a tenth of the solve's
    # time at n = 4096 on the project's CPU); the exact check runs only to tell an overflowing sum from a bad entry.
    if not bool(torch.isfinite(A.sum())) and not bool(torch.isfinite(A).all()):
        raise ValueError("C has non-finite entries")
    scale = torch.diagonal(A, dim1=-2, dim2=-1).double().mean(-1)  # tr(C)/n, (B,)
    if not bool((scale > 0).all()):
        raise ValueError("tr(C) must be positive (an empty or all-zero calibration set?)")
    with torch.no_grad():
        retries = 0 if precision == "auto" and first == torch.float32 else RIDGE_RETRIES
        L, shift = implementation(A).ridged_cholesky(A, ridge * scale, retries)
        if L is None and retries == 0:  # float32 was not enough (and A may be overwritten): from C again
            A = working_copy(C, torch.float64)
            L, shift = implementation(A).ridged_cholesky(A, ridge * scale, RIDGE_RETRIES)
        if L is None:
            raise ValueError(f"C is not positive semi-definite to within a ridge of {shift.max().item():.3g} "
                             "(tr(C)/n · 1e-6 · 10^6): is it a covariance?")
        del A
        gen = None
        if seed is not None:
            gen = torch.Generator(device=L.device).manual_seed(int(seed))
        # Drawn in the working dtype (half the time of a float64 draw in float32), once for every backend.
        start = torch.randn(L.shape[0], n, l, dtype=L.dtype, device=L.device, generator=gen)
        theta, vectors, blocks = implementation(L).krylov_ritz(L, start, k, n_iter, float(tol))
    values = 1.0 / theta - shift[:, None]
    return (values, vectors, blocks) if batched else (values[0], vectors[0], blocks)
