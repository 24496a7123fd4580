"""Null-space helpers of the activation-aware methods (LoRA-Null, docs/methods.md).

- :func:`eigh_ascending` / :func:`smallest_eigenvectors`: the eigenbasis of a covariance and its "null space", the
  directions the calibration activations barely use (exactly by eigh, or by :func:`randomized_smallest`, a
  block Krylov iteration on C⁻¹ about ten times faster at LLM sizes); :func:`minor_singular_components` (MiLoRA);
- :func:`row_space_basis`: an orthonormal basis of an adapter's input subspace (the row space of A);
- :func:`energy_fraction` ``tr(QᵀCQ) / tr(C)`` and :func:`leak` ``‖X Q_A‖²_F / ‖X‖²_F``: how much activation
  energy falls inside a subspace. Both are scale-free: a random r-dim subspace of ``in`` dims gets about ``r / in``.

Decompositions run in float32 or float64 whatever the input dtype (never in half precision: the null space lives
where half-precision rounding dominates).
"""
from __future__ import annotations

import math
import operator

import torch

from ._dtypes import compute_dtype
from .ops import null_space

_EIGH_DTYPES = (torch.float32, torch.float64)
_METHODS = ("auto", "eigh", "randomized")

# "auto" runs eigh below this size: exact, and below it both take milliseconds. Measured on the project's 2-core
# CPU (k = max(4, n/64), i^-1 spectrum under a random rotation, 2n tokens, best of 5, quiet machine, the Krylov
# solver): eigh / randomized = 1.1x at n = 256 (2.9 vs 2.7 ms), 1.6x at 384, 2.7x at 512 (10 vs 3.7 ms), 3.9x at
# 768, 5.4x at 1024, 8.3x at 2048.
AUTO_EIGH_BELOW = 512
DEFAULT_OVERSAMPLE = 16
# The randomized solver's Krylov blocks: at most DEFAULT_N_ITER, fewer when the Ritz estimate of the k smallest
# eigenvalues' sum falls by at most DEFAULT_TOL (relative) from one block to the next. On real activations
# (SmolLM2-135M blocks 3/10/20, k = 64, b = 80) that sum is 1.06-1.12x the exact one after 2 blocks, 1.01-1.04x
# after 3, and the test stops there (it fell by 5-8% with the third block): held-out leak 1.03-1.07x eigh's, where
# 2 blocks give 1.12-1.21x (benchmarks/results/nullspace_real_smollm2_*.csv).
DEFAULT_N_ITER = 8
DEFAULT_TOL = 0.1
MINOR_N_ITER = 16  # minor_singular_components: see its docstring
MINOR_TOL = 1e-4
# The ridge added before the Cholesky factorisation, relative to tr(C)/n. A float32-accumulated covariance is only
# known to ~1e-7 of its largest entries: below that floor it can be indefinite and its eigenvectors are noise
# anyway. Shifting every eigenvalue by the same amount leaves the eigenvectors unchanged; it is raised tenfold
# (a few times at most) when the factorisation still fails.
RIDGE = 1e-6


def _check_covariance(C: torch.Tensor, name: str = "C", batched: bool = False) -> None:
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(C).__name__}")
    if not C.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {C.dtype}")
    dims = (2, 3) if batched else (2,)
    if C.dim() not in dims or C.shape[-1] != C.shape[-2]:
        want = "(in, in) or (batch, in, in)" if batched else "(in, in)"
        raise ValueError(f"{name} must be a square {want} matrix, got shape {tuple(C.shape)}")


def _check_finite(t: torch.Tensor, name: str) -> None:
    """ValueError naming the argument when ``t`` holds NaN or Inf (LAPACK's SVD would raise a bare
    ``_LinAlgError``, and the measures would return nan)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or Inf entries")


def _is_int(v) -> bool:
    """An int, or an integer scalar of another library (numpy); never a bool (``True`` is no count or seed)."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _check_solver_options(oversample, n_iter, tol, seed, ridge=RIDGE) -> None:
    """The randomized solver's knobs, checked by name before any work (also where the eigh path ignores them: a bad
    value is a mistake whichever method runs)."""
    for name, v, low in (("oversample", oversample, 0), ("n_iter", n_iter, 1)):
        if not _is_int(v) or v < low:
            raise ValueError(f"{name} must be an int ≥ {low}, got {v!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number ≥ 0, got {tol!r}")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be None or an int in [-2**63, 2**64) (torch.Generator's range), got {seed!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge <= 0:
        raise ValueError(f"ridge must be a finite number > 0, got {ridge!r}")


def _entry(C: torch.Tensor, b: int) -> str:
    return f"C[{b}]" if C.dim() == 3 else "C"


def _non_finite(C: torch.Tensor) -> ValueError | None:
    """The ValueError naming the first batch entry of C with NaN or Inf, or None."""
    Cs = C.detach().reshape(-1, *C.shape[-2:])
    bad = (~torch.isfinite(Cs)).flatten(1).any(1).nonzero().flatten().tolist()
    return ValueError(f"{_entry(C, bad[0])} has NaN or Inf entries") if bad else None


def _why_unsolvable(C: torch.Tensor, error: ValueError) -> ValueError:
    """A solver error on C, with the batch entry it comes from: checked only after a failure, so a solve that works
    pays for no extra pass over C."""
    non_finite = _non_finite(C)
    if non_finite is not None:
        return non_finite
    Cs = C.detach().reshape(-1, *C.shape[-2:])
    for b in range(Cs.shape[0]):
        if not float(torch.diagonal(Cs[b]).double().sum()) > 0:
            return ValueError(f"{_entry(C, b)} has tr(C) ≤ 0: an all-zero covariance (a layer that saw no "
                              "calibration token?) has no null space to find")
    return NotPositiveSemidefiniteError(str(error))


class NotPositiveSemidefiniteError(ValueError):
    """The randomized solver was given a C with eigenvalues clearly below zero (beyond a float32 covariance's
    rounding): it works on ``(C + δI)⁻¹``, and with the shift δ large enough to factor such a C its eigenvalues and
    vectors are wrong (measured: eigenvalues 2× off, vectors 79° away). eigh handles any symmetric matrix."""


# A float32-accumulated covariance can be indefinite below its rounding floor (~1e-7 of its largest entries, times
# a modest factor for long sums); an eigenvalue below -NEGATIVE_RTOL · tr(C) is far beyond that, i.e. C is not a
# covariance. (tr(C) ≥ λ_max for a PSD C, so this floor is at least 1e3 float32 ulps of the largest eigenvalue.)
NEGATIVE_RTOL = 1e3 * torch.finfo(torch.float32).eps


def _refuse_negative(C: torch.Tensor, values: torch.Tensor) -> None:
    floor = -NEGATIVE_RTOL * torch.diagonal(C.detach(), dim1=-2, dim2=-1).double().sum(-1)
    bad = (values.reshape(-1, values.shape[-1])[:, 0] < floor.reshape(-1)).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        smallest = values.reshape(-1, values.shape[-1])[b, 0].item()
        raise NotPositiveSemidefiniteError(
            f"{_entry(C, b)} is not positive semi-definite: an eigenvalue is about {smallest:.3g}, below "
            f"-{NEGATIVE_RTOL:.1e} · tr(C) (far beyond float32 rounding of a covariance), where the randomized "
            "solver is not accurate; use method='eigh'")


def eigh_ascending(C: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of the symmetric ``C``, eigenvalues ascending.

    Args:
        C: (in, in) or (batch, in, in) symmetric (only its lower triangle is read), any float dtype.
        dtype: float32 or float64, the precision of the decomposition.
    Returns:
        ``eigenvalues (…, in)`` ascending and ``eigenvectors (…, in, in)`` (column i belongs to eigenvalue i), in
        ``dtype``.
    Raises:
        ValueError: C not square, non-finite entries, or dtype not float32/float64.
    """
    _check_covariance(C, batched=True)
    if dtype not in _EIGH_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    A = C.detach().to(dtype)
    if not torch.isfinite(A).all():
        raise _non_finite(A)
    return torch.linalg.eigh(A)  # LAPACK / cuSOLVER syevd: ascending already


def pick_method(n: int, k: int, oversample: int = DEFAULT_OVERSAMPLE) -> str:
    """What ``method="auto"`` runs for an (n, n) matrix and k eigenvectors: ``"eigh"`` below
    :data:`AUTO_EIGH_BELOW` or when the sketch would not be much smaller than n (``k + oversample > n / 4``),
    else ``"randomized"``."""
    for name, v, low in (("n", n, 1), ("k", k, 1), ("oversample", oversample, 0)):
        if not _is_int(v) or v < low:
            raise ValueError(f"{name} must be an int ≥ {low}, got {v!r}")
    return "eigh" if n < AUTO_EIGH_BELOW or 4 * (k + oversample) > n else "randomized"


def smallest_eigenvectors(C: torch.Tensor, k: int, dtype: torch.dtype = torch.float32, method: str = "auto", *,
                          oversample: int = DEFAULT_OVERSAMPLE, n_iter: int = DEFAULT_N_ITER,
                          tol: float = DEFAULT_TOL, seed: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The null-space basis of LoRA-Null: eigenvectors of the ``k`` smallest eigenvalues of ``C``.

    Methods:

    - ``"eigh"``: a full eigendecomposition (:func:`eigh_ascending`) in ``dtype``; exact, O(n³) with a large constant.
    - ``"randomized"``: block Krylov iteration on ``C⁻¹`` (:func:`randomized_smallest`): one Cholesky
      factorisation of ``C + δI`` (δ = :data:`RIDGE` · tr(C)/n, raised if needed; float32 when that is enough,
      else float64), up to ``n_iter`` blocks of ``k + oversample`` columns (a pair of triangular solves each) until
      the Rayleigh–Ritz estimate converges to ``tol``. Speed and held-out leak against eigh:
      benchmarks/results/nullspace_*.csv and docs/performance.md.
    - ``"auto"``: :func:`pick_method`; a C the randomized method refuses as not positive semi-definite
      (:class:`NotPositiveSemidefiniteError`) is solved by eigh instead, which is exact for any symmetric matrix.

    Args:
        C: (in, in) symmetric covariance, or (batch, in, in) for same-shape layers solved in one call.
        k: ``1 ≤ k ≤ in``. dtype: float32 or float64, the dtype of the result (and of eigh's decomposition).
        method: ``"auto"``, ``"eigh"`` or ``"randomized"`` (when ``k + oversample ≥ in`` the sketch would be no
            smaller than C, and eigh runs: exact, and cheaper there).
        oversample, n_iter, tol, seed: of the randomized method (:func:`randomized_smallest`; seed: of its
            Gaussian start, None draws from torch's global generator). Ignored by eigh.
    Returns:
        ``eigenvalues (…, k)`` ascending and ``Q (…, in, k)`` with orthonormal columns, in ``dtype``, on C's device.
    Raises:
        ValueError: bad k / method / dtype / solver option (named), non-finite C, or (randomized) a C with
            ``tr(C) ≤ 0`` or, with ``method="randomized"``, not positive semi-definite (the batch entry is named).
    """
    _check_covariance(C, batched=True)
    n = C.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}], got {k!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if dtype not in _EIGH_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    _check_solver_options(oversample, n_iter, tol, seed)
    cached = _lookup(C, k)
    if cached is not None:
        return cached[0].to(dtype), cached[1].to(dtype)
    asked = method
    if method == "auto":
        method = pick_method(n, k, oversample)
    if method == "randomized" and k + oversample < n:
        try:
            values, vectors = randomized_smallest(C, k, oversample=oversample, n_iter=n_iter, tol=tol, seed=seed)
            return values.to(dtype), vectors.to(dtype)
        except NotPositiveSemidefiniteError:
            if asked != "auto":  # asked for by name: say so rather than silently run an O(n³) eigh
                raise
    values, vectors = eigh_ascending(C, dtype)
    return values[..., :k], vectors[..., :k]


def randomized_smallest(C: torch.Tensor, k: int, *, oversample: int = DEFAULT_OVERSAMPLE,
                        n_iter: int = DEFAULT_N_ITER, tol: float = DEFAULT_TOL, seed: int | None = 0,
                        ridge: float = RIDGE, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest eigenpairs of the symmetric positive semi-definite ``C`` by a randomized block Krylov
    iteration on ``C⁻¹`` (Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster approximate
    singular value decomposition", on the inverse), stopped when its Rayleigh–Ritz estimate has converged.

    Why Krylov: C's smallest eigenvalues crowd together on real activations (SmolLM2-135M: λ₆₄/λ₈₀ ≈ 0.91-0.96),
    where subspace iteration (Halko–Martinsson–Tropp 4.4: only the last block is kept) gains little per solve. A
    Krylov basis keeps every block, and per triangular solve it reaches a given held-out leak with about a quarter
    fewer solves (3 blocks ≈ 4 subspace iterations, measured; docs/performance.md).

    Why a ridge: C is factored as ``C + δI`` with δ = ``ridge`` · tr(C)/n (multiplied by ten up to six times while
    the factorisation fails): a float32-accumulated covariance is indefinite below its rounding floor. The shift
    changes no eigenvector, only how fast directions below δ separate from each other, and those are below C's
    float32 rounding floor anyway.

    Rayleigh–Ritz is on ``(C + δI)⁻¹`` in the Krylov basis (one triangular solve per block, which the next block
    needs anyway; no n × n product), in the working precision: the Ritz vectors are those of largest ``θ``, the
    values ``1/θ − δ``, resolved relative to themselves rather than to ``‖C‖``. It runs after every block: when
    ``Σ 1/θ`` over the top k (the estimate of C's k smallest eigenvalues plus δ, summed) fell by at most ``tol``
    (relative) since the previous block, the iteration stops (``tol=0``: all ``n_iter`` blocks).

    Precision (``precision``): ``"auto"`` factors and solves in float32 when n ≤ 8192 and the float32 Cholesky of
    ``C + δI`` succeeds at the first ridge, else in float64 (the wanted eigenvalues are the smallest, and a float32
    factorisation that only goes through with a larger shift would blur them); ``"float32"`` / ``"float64"``
    force one. On the held-out leak of a heavy-tailed n = 4096 covariance both precisions match eigh's
    (benchmarks/results/nullspace_*.csv); float32 halves the time on a CPU, and more on GPUs.

    Cost: one Cholesky (n³/3) plus ``2q + 1`` triangular solves with ``l = k + oversample`` columns (``n² l``
    each) for q blocks, and the products of the ``n × ql`` basis: batched over a leading dim by the same
    torch.linalg calls (cuSOLVER / LAPACK). Memory: C's working copy in the working dtype, factored in place on the
    CPU (LAPACK), next to a separate factor elsewhere; and the basis. The returned vectors are orthonormal to
    float64 precision.

    Args:
        C: (n, n) or (batch, n, n), any float dtype. k: ``1 ≤ k``, ``k + oversample < n``.
    Returns:
        ``values (…, k)`` ascending, ``Q (…, n, k)`` orthonormal, float64.
    Raises:
        ValueError: a bad argument (named: k, oversample, n_iter, tol, seed, ridge, precision); non-finite C,
            ``tr(C) ≤ 0`` (the batch entry is named); :class:`NotPositiveSemidefiniteError` for a C not positive
            semi-definite beyond float32 rounding (an eigenvalue below ``-NEGATIVE_RTOL · tr(C)``, or not factorable
            with the largest ridge).
    """
    _check_covariance(C, batched=True)
    n = C.shape[-1]
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be an int ≥ 1, got {k!r}")
    _check_solver_options(oversample, n_iter, tol, seed, ridge)
    if k + oversample >= n:
        raise ValueError(f"need k + oversample < n = {n}; got k={k}, oversample={oversample}")
    if precision not in ("auto", "float32", "float64"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'float64', got {precision!r}")
    try:
        values, vectors, _ = null_space.smallest_eigenpairs(C, k, oversample=oversample, n_iter=n_iter, tol=tol,
                                                            seed=seed, ridge=ridge, precision=precision)
    except ValueError as e:
        raise _why_unsolvable(C, e) from None
    _refuse_negative(C, values)
    return values, vectors


# ---- bases computed ahead (inject solves a block's same-shape covariances in one batched call) --------------------

_PRECOMPUTED: list[dict] = []


class precomputed:
    """Context manager: inside it, :func:`smallest_eigenvectors` on one of the given covariance tensors (the very
    object, by identity) returns the given eigenpairs (sliced to k) instead of solving again.

    ``solved``: iterable of ``(C, values (K,), Q (in, K))``; a call with ``k > K`` solves as usual. Layers that
    share one covariance tensor (q/k/v) thus share one solve."""

    def __init__(self, solved):
        try:
            self.table = {id(C): (C, values, Q) for C, values, Q in solved}
        except (TypeError, ValueError):
            raise TypeError("precomputed needs an iterable of (C, values, Q) triples") from None
        if not all(isinstance(t, torch.Tensor) for entry in self.table.values() for t in entry):
            raise TypeError("precomputed needs (C, values, Q) triples of tensors")

    def __enter__(self):
        _PRECOMPUTED.append(self.table)
        return self

    def __exit__(self, *exc):
        _PRECOMPUTED.remove(self.table)
        return False


def _lookup(C: torch.Tensor, k: int):
    for table in reversed(_PRECOMPUTED):
        hit = table.get(id(C))
        if hit is not None and hit[0] is C and hit[1].shape[-1] >= k:
            return hit[1][..., :k], hit[2][..., :k]
    return None


def minor_singular_components(W: torch.Tensor, r: int, method: str = "auto", *, oversample: int | None = None,
                              n_iter: int = MINOR_N_ITER, tol: float = MINOR_TOL,
                              seed: int | None = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` smallest singular triplets of ``W (out, in)`` (MiLoRA's minor components).

    ``"eigh"`` (``method="auto"`` below :data:`AUTO_EIGH_BELOW`): the full ``torch.linalg.svd`` of W. Otherwise the
    r smallest eigenvectors of the smaller Gram matrix (``WᵀW`` when in ≤ out, else ``WWᵀ``), formed in float64 (it
    squares W's condition number), by :func:`smallest_eigenvectors`; then the exact SVD of the thin ``W V`` (or
    ``Uᵀ W``) gives the triplets, also when some singular values are zero.

    A weight's minor singular values crowd together at the low edge of its spectrum (a Gaussian 4096 × 1024 W:
    σ₁₆ and σ₈₀ differ by a few percent), so the Krylov iteration needs a tighter convergence test and a wider
    block than for covariances (``oversample`` None: ``max(64, r)``; ``tol`` 1e-4, at most ``n_iter`` = 16
    blocks). On that W with r = 16 this gives principal angles to the exact minor subspace of at most 0.28°
    (median 0.09°), 1.5-1.8× faster than the full SVD; ``tol=1e-2`` leaves some at 7°
    (benchmarks/results/nullspace_*.csv).

    Returns:
        ``U (out, r)``, ``S (r,)`` descending, ``Vh (r, in)`` in float32 (float64 for float64 W), on W's device:
        the same ordering as the last r columns/rows of a full SVD.
    """
    if not isinstance(W, torch.Tensor) or not W.dtype.is_floating_point or W.dim() != 2:
        raise ValueError(f"W must be a floating-point (out, in) matrix, got {getattr(W, 'shape', type(W).__name__)}")
    m = min(W.shape)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= m:
        raise ValueError(f"r must be an int in [1, {m}], got {r!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    _check_solver_options(max(64, r) if oversample is None else oversample, n_iter, tol, seed)
    _check_finite(W, "W")
    dtype = compute_dtype(W.dtype)
    if oversample is None:
        oversample = max(64, r)
    if method == "auto":
        method = pick_method(m, r, oversample)
    if method == "eigh":
        U, S, Vh = torch.linalg.svd(W.detach().to(dtype), full_matrices=False)
        return U[:, -r:], S[-r:], Vh[-r:, :]
    Wd = W.detach().to(torch.float64)
    right = W.shape[1] <= W.shape[0]
    G = Wd.t() @ Wd if right else Wd @ Wd.t()
    _, V = smallest_eigenvectors(G, r, torch.float64, method, oversample=oversample, n_iter=n_iter, tol=tol,
                                 seed=seed)
    if right:  # W V = U' S V'ᵀ  ⇒  W ≈ U' S (V V')ᵀ on span(V)
        U, S, Vh_small = torch.linalg.svd(Wd @ V, full_matrices=False)
        Vh = Vh_small @ V.t()
    else:  # Uᵀ W = U' S V'ᵀ  ⇒  the left factor is U U'
        U_small, S, Vh = torch.linalg.svd(V.t() @ Wd, full_matrices=False)
        U = V @ U_small
    return U.to(dtype), S.to(dtype), Vh.to(dtype)


def row_space_basis(A: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """An orthonormal basis ``Q_A (in, r')`` of the row space of ``A (r, in)``, in float32 (float64 for float64 A).

    Directions with singular value ≤ ``rtol · σ_max`` are dropped (default ``max(r, in) · eps`` of the dtype), so a
    rank-deficient A gives ``r' < r`` and an all-zero A an empty ``(in, 0)`` basis.
    """
    if not isinstance(A, torch.Tensor) or not A.dtype.is_floating_point or A.dim() != 2:
        raise ValueError(f"A must be a floating-point (r, in) matrix, got {getattr(A, 'shape', type(A).__name__)}")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0):
        raise ValueError(f"rtol must be None or a number ≥ 0, got {rtol!r}")
    _check_finite(A, "A")
    dtype = compute_dtype(A.dtype)
    _, S, Vh = torch.linalg.svd(A.detach().to(dtype), full_matrices=False)
    if rtol is None:
        rtol = max(A.shape) * torch.finfo(dtype).eps
    keep = S > rtol * S.max() if S.numel() and S.max() > 0 else torch.zeros_like(S, dtype=torch.bool)
    return Vh[keep].t()


def energy_fraction(C: torch.Tensor, Q: torch.Tensor) -> float:
    """``tr(Qᵀ C Q) / tr(C)``: the fraction of the activation energy that lies in ``span(Q)``.

    Args:
        C: (in, in) uncentred covariance (any scale). Q: (in, k) with orthonormal columns (an adapter's A is not:
            pass :func:`row_space_basis` of it).
    Returns:
        A float in [0, 1] (up to rounding).
    Raises:
        ValueError: shapes, NaN / Inf in C or Q, columns of Q that are not orthonormal, ``tr(C) ≤ 0``.
    """
    _check_covariance(C)
    if not isinstance(Q, torch.Tensor) or not Q.dtype.is_floating_point or Q.dim() != 2 \
            or Q.shape[0] != C.shape[0]:
        raise ValueError(f"Q must be a floating-point ({C.shape[0]}, k) matrix, got "
                         f"{getattr(Q, 'shape', type(Q).__name__)}")
    _check_finite(C, "C")
    _check_finite(Q, "Q")
    dtype = compute_dtype(C.dtype)
    Cd, Qd = C.detach().to(dtype), Q.detach().to(device=C.device, dtype=dtype)
    # A non-orthonormal Q gives a number that is no fraction at all (above 1 for a scaled basis): refuse it.
    off = (Qd.t() @ Qd - torch.eye(Qd.shape[1], dtype=dtype, device=Qd.device)).abs().max().item() if Qd.numel() else 0.0
    if off > 1e-3:
        raise ValueError(f"Q must have orthonormal columns (max |QᵀQ − I| = {off:.3g}); for an adapter's A pass "
                         "lk.nullspace.row_space_basis(A)")
    total = torch.diagonal(Cd).sum()
    if total <= 0:
        raise ValueError("tr(C) must be positive (an empty or all-zero calibration set?)")
    return ((Cd @ Qd) * Qd).sum().item() / total.item()


def leak(X: torch.Tensor, A: torch.Tensor) -> float:
    """The leak of docs/methods.md: ``‖X Q_A‖²_F / ‖X‖²_F``, the share of the energy of activations ``X`` that an
    adapter with down-projection ``A`` sees, ``Q_A`` an orthonormal basis of A's row space.

    Args:
        X: (..., in) held-out activations. A: (r, in) the adapter's down-projection (lora_A).
    Returns:
        A float in [0, 1]: about ``r / in`` for a random A, near 0 for a LoRA-Null A on knowledge-like X.
    Raises:
        ValueError: shapes, NaN / Inf in X or A, an X without energy.
    """
    if not isinstance(X, torch.Tensor) or not X.dtype.is_floating_point or X.dim() < 1:
        raise ValueError("X must be a floating-point (..., in) tensor")
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[1] != X.shape[-1]:
        raise ValueError(f"A must be (r, {X.shape[-1]}), got {getattr(A, 'shape', type(A).__name__)}")
    _check_finite(X, "X")
    _check_finite(A, "A")
    dtype = compute_dtype(X.dtype)
    X2 = X.detach().reshape(-1, X.shape[-1]).to(dtype)
    total = (X2 * X2).sum()
    if total <= 0:
        raise ValueError("X has no energy (all zeros or empty)")
    Q_A = row_space_basis(A.to(X2.device)).to(dtype)
    return ((X2 @ Q_A) ** 2).sum().item() / total.item()
