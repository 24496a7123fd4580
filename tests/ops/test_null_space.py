"""The null_space op (the randomized solver behind nullspace.randomized_smallest): dispatch, the torch backend's
numerics (step by step against the float64 reference), its backend contract, and (CUDA only) the
extension's backend against the torch one and against eigh."""
import platform
import sys

import pytest
import torch

import loranull_kernels.backend as backend
from loranull_kernels import _extension, nullspace
from loranull_kernels.ops import null_space
from loranull_kernels.ops.null_space import cuda_backend, lapack, torch_backend

from ..test_nullspace import heavy_tailed, known_covariance

OPTIONS = dict(oversample=nullspace.DEFAULT_OVERSAMPLE, n_iter=nullspace.DEFAULT_N_ITER, tol=nullspace.DEFAULT_TOL,
               seed=0, ridge=nullspace.RIDGE, precision="auto")


def unconverged_problem():
    """A 64 × 64 covariance from a fixed generator, on which two Krylov blocks of 7 columns are far from converged:
    the answer depends on every step and on the start, so matching it pins the numerics, not just correctness."""
    X = torch.randn(96, 64, generator=torch.Generator().manual_seed(2024), dtype=torch.float64)
    return X.t() @ X / 96


@pytest.mark.parametrize("precision, tol", [("float64", 1e-9), ("float32", 2e-3)])
@pytest.mark.parametrize("n_blocks", [1, 2])
def test_torch_backend_follows_the_float64_reference_step_by_step(precision, tol, n_blocks):
    """On a problem far from converged the answer depends on every step and on the start: matching the plain
    float64 reference (same Gaussian start, same ridge) there checks the algorithm, not only the end result."""
    from loranull_kernels import reference

    C = unconverged_problem()
    with backend.use("torch"):
        values, Q, blocks = null_space.smallest_eigenpairs(C, 3, oversample=4, n_iter=n_blocks, tol=0.0, seed=0,
                                                           ridge=nullspace.RIDGE, precision=precision)
    assert blocks == n_blocks
    dtype = torch.float64 if precision == "float64" else torch.float32  # the start is drawn in the working dtype
    start = torch.randn(64, 7, generator=torch.Generator().manual_seed(0), dtype=dtype)
    delta = nullspace.RIDGE * C.diagonal().mean().item()
    want_values, want_P = reference.null_space_krylov(C, 3, start, n_blocks=n_blocks, delta=delta)
    assert (values - want_values).abs().max() < tol * want_values.abs().max()
    assert (Q @ Q.t() - want_P).abs().max() < tol
    eigh_values = torch.linalg.eigvalsh(C)[:3]
    assert ((values - eigh_values) / eigh_values).max() > 5e-3, "the test problem must be unconverged to pin the steps"
    public = nullspace.randomized_smallest(C, 3, oversample=4, n_iter=n_blocks, tol=0.0, seed=0, precision=precision)
    assert all(torch.equal(a, b) for a, b in zip(public, (values, Q)))


def test_krylov_blocks_stop_when_the_ritz_estimate_converges():
    """tol = 0 runs every block; a positive tol stops once a block lowers the estimate of the k smallest
    eigenvalues' sum by at most tol (relative). Each block only adds to the basis, so the estimate never rises and
    the answer with more blocks is at least as good."""
    from loranull_kernels import reference

    C = unconverged_problem()

    def run(n_iter, tol):
        return null_space.smallest_eigenpairs(C, 3, **dict(OPTIONS, oversample=4, n_iter=n_iter, tol=tol,
                                                           precision="float64"))

    sums = [run(q, 0.0)[0].sum().item() for q in range(1, 7)]
    assert all(a >= b - 1e-12 for a, b in zip(sums, sums[1:]))
    exact = torch.linalg.eigvalsh(C)[:3].sum().item()
    assert sums[-1] - exact < 1e-3 * exact < sums[0] - exact
    drops = [(a - b) / b for a, b in zip(sums, sums[1:])]  # the relative fall the test sees at blocks 2, 3, ...
    tol = (drops[2] + drops[3]) / 2 if drops[2] > drops[3] else None
    assert tol is not None, "the falls must shrink on this problem for the test to pin the stopping block"
    values, _, blocks = run(8, tol)
    stop = next(q for q, d in enumerate(drops, start=2) if d <= tol)
    assert blocks == stop and abs(values.sum().item() - sums[stop - 1]) < 1e-12
    assert run(8, 0.0)[2] == 8 and run(8, 1e9)[2] == 2
    start = torch.randn(64, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta = nullspace.RIDGE * C.diagonal().mean().item()
    assert abs(reference.null_space_krylov(C, 3, start, 3, delta)[0].sum().item() - sums[2]) < 1e-9


def test_dispatch_runs_the_torch_backend_on_cpu(monkeypatch):
    assert null_space.implementation(torch.zeros(2, 2)) is torch_backend
    assert null_space.implementation(torch.zeros(2, 2, dtype=torch.float64)) is torch_backend
    calls = []
    for name in ("ridged_cholesky", "krylov_ritz"):
        real = getattr(torch_backend, name)
        monkeypatch.setattr(torch_backend, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    C, _ = known_covariance(48, torch.linspace(0.1, 1, 48, dtype=torch.float64))
    null_space.smallest_eigenpairs(C.float(), 4, **OPTIONS)
    assert calls == ["ridged_cholesky", "krylov_ritz"]
    with backend.use("cuda"), pytest.raises(RuntimeError, match="CUDA extension"):
        null_space.smallest_eigenpairs(C, 4, **OPTIONS)


def test_float32_that_needs_a_larger_ridge_is_solved_in_float64(monkeypatch):
    C, _ = known_covariance(64, torch.cat([torch.full((4,), -1e-5), torch.ones(60)]).double())
    dtypes = []
    real = torch_backend.krylov_ritz
    monkeypatch.setattr(torch_backend, "krylov_ritz", lambda L, *a: dtypes.append(L.dtype) or real(L, *a))
    values, Q, _ = null_space.smallest_eigenpairs(C.float(), 4, **OPTIONS)
    forced, _, _ = null_space.smallest_eigenpairs(C.float(), 4, **dict(OPTIONS, precision="float32"))
    assert dtypes == [torch.float64, torch.float32]
    assert values.max() < 0 and Q.shape == (64, 4) and forced.shape == (4,)


def gapped_batch(B, n, k, dtype=torch.float64, low=(-7, -6), high=(-3, 0)):
    """B covariances with the k smallest eigenvalues in 10^low, the others in 10^high, and their null spaces."""
    lam = torch.cat([torch.logspace(*low, k, dtype=torch.float64), torch.logspace(*high, n - k, dtype=torch.float64)])
    pairs = [known_covariance(n, lam) for _ in range(B)]
    return torch.stack([C for C, _ in pairs]).to(dtype), torch.stack([V[:, :k] for _, V in pairs])


def lapack_expected() -> bool:
    """torch's Linux x86-64 CPU wheels (CI's) link MKL and export its LAPACK: the in-place path must be there."""
    return sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.mark.parametrize("in_place", [True, False])
def test_ridged_cholesky_raises_the_ridge_of_the_failing_entries_only(in_place, monkeypatch):
    if in_place and not lapack.available():
        assert not lapack_expected(), "LAPACK's potrf not found in torch's own library"
        pytest.skip("this torch build exports no LAPACK: the cholesky_ex path (in_place=False) is what runs")
    if not in_place:
        monkeypatch.setattr(lapack, "supports", lambda A: False)
    good, _ = known_covariance(32, torch.linspace(0.5, 1, 32, dtype=torch.float64))
    bad, _ = known_covariance(32, torch.cat([torch.tensor([-5e-5]), torch.linspace(0.5, 1, 31)]).double())
    A = torch.stack([good, bad, good])
    before = A.clone()
    delta = torch.full((3,), 1e-6, dtype=torch.float64)
    L, used = torch_backend.ridged_cholesky(A, delta, retries=6)
    raised = torch.tensor([1e-6, 1e-6 * 10 * 10, 1e-6], dtype=torch.float64)  # twice tenfold, in float64
    assert torch.equal(used, raised)
    assert torch.equal(delta, torch.full((3,), 1e-6, dtype=torch.float64)), "the caller's ridges are not changed"
    shifted = before + used[:, None, None] * torch.eye(32, dtype=torch.float64)
    factor = L.tril()
    assert (factor @ factor.transpose(-1, -2) - shifted).abs().max() < 1e-12
    if in_place:  # factored where it lay: no second buffer, the strict upper triangle left as it was
        assert L.data_ptr() == A.data_ptr() and torch.equal(A.triu(1), before.triu(1))
    else:  # cholesky_ex: a separate, clean L, and A shifted back
        assert torch.equal(L, L.tril()) and (A - before).abs().max() < 1e-15
    none, tried = torch_backend.ridged_cholesky(before.clone(), delta, retries=1)
    assert none is None and torch.equal(tried, raised)  # 1e-6 and 1e-5 failed; 1e-4 would be next


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lapack_potrf_in_place_matches_torch_cholesky(dtype):
    if not lapack.available():
        assert not lapack_expected(), "LAPACK's potrf not found in torch's own library"
        pytest.skip("this torch build exports no LAPACK")
    X = torch.randn(70, 53, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    A = (X.t() @ X / 70 + 0.1 * torch.eye(53, dtype=torch.float64)).to(dtype)
    M = A + torch.triu(torch.full_like(A, 7.0), 1)  # garbage above the diagonal: only the lower triangle is read
    upper = M.triu(1)
    assert lapack.potrf_(M) == 0
    want = torch.linalg.cholesky(A)
    eps = torch.finfo(dtype).eps
    assert (M.tril() - want).abs().max() < 100 * eps * want.abs().max()
    assert torch.equal(M.triu(1), upper), "the strict upper triangle is left as it was"
    bad = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0], dtype=dtype))
    assert lapack.potrf_(bad) == 3, "info: the order of the first leading minor that is not positive definite"
    for wrong in (A.t()[:, :50], A.half(), torch.zeros(3, 4, dtype=dtype)):
        assert not lapack.supports(wrong)
        with pytest.raises(ValueError, match="potrf_ needs"):
            lapack.potrf_(wrong)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(C=torch.eye(8), k=0), ValueError, "need 1 ≤ k"),
        (dict(C=torch.eye(8), k=4, oversample=4), ValueError, "k \\+ oversample < n"),
        (dict(C=torch.eye(8), k=2, n_iter=0), ValueError, "n_iter ≥ 1"),
        (dict(C=torch.eye(8), k=2.0), TypeError, "must be ints"),
        (dict(C=torch.eye(8), k=2, precision="half"), ValueError, "precision"),
        (dict(C=torch.ones(3, 4), k=1), ValueError, "C must be"),
        (dict(C=torch.eye(8, dtype=torch.int64), k=1), TypeError, "floating point"),
        (dict(C=torch.full((8, 8), float("nan")), k=1), ValueError, "non-finite"),
        (dict(C=torch.zeros(8, 8), k=1), ValueError, "tr\\(C\\)"),
        (dict(C=-torch.eye(8), k=1), ValueError, "tr\\(C\\)"),
        (dict(C=torch.diag(torch.tensor([-10.0] + [1.0] * 63)), k=1), ValueError, "positive semi-definite"),
    ],
)
def test_bad_input_raises_naming_the_problem(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        null_space.smallest_eigenpairs(**dict(dict(OPTIONS, oversample=2), **kwargs))


# ---- CUDA only: the extension's backend against the torch backend and against eigh -------------------------------

def projector_gap(Q, V):
    """max |Q Qᵀ − V Vᵀ| over a batch: 0 when the two bases span the same subspace."""
    Q, V = Q.double().cpu(), V.double().cpu()
    return (Q @ Q.transpose(-1, -2) - V @ V.transpose(-1, -2)).abs().max().item()


@pytest.mark.gpu
def test_gpu_dispatch_picks_the_extension():
    assert _extension.available(), _extension.status()
    assert null_space.implementation(torch.zeros(2, 2, device="cuda")) is cuda_backend
    with backend.use("torch"):
        assert null_space.implementation(torch.zeros(2, 2, device="cuda")) is torch_backend


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_cholesky_matches_torch_with_the_same_retries(dtype):
    good, _ = known_covariance(96, torch.linspace(0.5, 1, 96, dtype=torch.float64))
    bad, _ = known_covariance(96, torch.cat([torch.tensor([-5e-5]), torch.linspace(0.5, 1, 95)]).double())
    A = torch.stack([good, bad, good, bad]).to(dtype).cuda()
    before = A.clone()
    delta = torch.full((4,), 1e-6, dtype=torch.float64, device="cuda")
    L, used = cuda_backend.ridged_cholesky(A, delta, retries=6)
    Lt, used_t = torch_backend.ridged_cholesky(A.clone(), delta, retries=6)
    assert torch.equal(A, before), "the extension does not touch A"
    assert torch.equal(used, used_t) and used.device == A.device
    eps = torch.finfo(dtype).eps
    assert (L - Lt).abs().max() < 100 * eps and torch.equal(L, L.tril())
    none, tried = cuda_backend.ridged_cholesky(A, delta, retries=1)
    assert none is None and torch.equal(tried, torch_backend.ridged_cholesky(A.clone(), delta, retries=1)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, n, k, oversample", [(1, 300, 6, 10), (3, 257, 5, 16), (12, 48, 3, 5), (2, 20, 3, 5)])
def test_gpu_ritz_matches_torch_backend(dtype, B, n, k, oversample):
    """(12, 48) and (2, 20): the trsmBatched path; the others: the loop of trsm. (2, 20): the third block of 8 is cut
    to the 4 dimensions left, and the basis spans the whole space. Both backends run 3 blocks (tol = 0) from the same
    factor (the extension's) and the same start, drawn in its dtype."""
    C, V = gapped_batch(B, n, k, low=(-4, -3.5), high=(-2, 0))  # κ ≈ 1e4: float32 solves keep ~3 digits
    L, _ = cuda_backend.ridged_cholesky(C.to(dtype).cuda(), torch.full((B,), 1e-8, dtype=torch.float64,
                                                                      device="cuda"), retries=6)
    start = torch.randn(B, n, k + oversample, dtype=dtype, generator=torch.Generator().manual_seed(0)).cuda()
    theta, Q, blocks = cuda_backend.krylov_ritz(L, start, k, 3, 0.0)
    theta_t, Q_t, blocks_t = torch_backend.krylov_ritz(L, start, k, 3, 0.0)
    assert blocks == blocks_t == 3
    assert theta.shape == (B, k) and Q.shape == (B, n, k) and theta.dtype == Q.dtype == torch.float64
    assert theta.device == Q.device == L.device
    assert torch.all(theta[:, :-1] >= theta[:, 1:])
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert ((theta - theta_t).abs() / theta_t).max() < tol and projector_gap(Q, Q_t) < tol
    assert (Q.transpose(-1, -2) @ Q - torch.eye(k, dtype=torch.float64, device="cuda")).abs().max() < 1e-12
    assert projector_gap(Q, V) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_ritz_stops_at_the_torch_backend_block(dtype):
    """tol > 0: both backends stop at the same block. On unconverged_problem the relative falls of the estimate
    shrink tenfold and more per block, so a tol halfway (geometrically) between the falls at blocks 3 and 4 pins the
    stop at block 4 far from any rounding difference between the backends. Two entries, the second shifted, so the
    stop waits for both."""
    C = unconverged_problem().to(dtype).repeat(2, 1, 1)
    C[1] += 0.05 * torch.eye(64, dtype=dtype)
    delta = torch.full((2,), nullspace.RIDGE * C[0].diagonal().mean().item(), dtype=torch.float64, device="cuda")
    L, _ = cuda_backend.ridged_cholesky(C.cuda(), delta, retries=6)
    start = torch.randn(2, 64, 7, dtype=dtype, generator=torch.Generator().manual_seed(0)).cuda()
    energy = [(1 / torch_backend.krylov_ritz(L, start, 3, q, 0.0)[0]).sum(-1) for q in range(1, 5)]
    falls = [((a - b) / b).max().item() for a, b in zip(energy, energy[1:])]  # the test's falls at blocks 2, 3, 4
    assert falls[0] > falls[1] > 10 * falls[2], "the falls must shrink for the test to pin the stopping block"
    tol = (falls[1] * falls[2]) ** 0.5
    theta, Q, blocks = cuda_backend.krylov_ritz(L, start, 3, 8, tol)
    theta_t, Q_t, blocks_t = torch_backend.krylov_ritz(L, start, 3, 8, tol)
    assert blocks == blocks_t == 4
    close = 1e-3 if dtype == torch.float32 else 1e-9
    assert ((theta - theta_t).abs() / theta_t).max() < close and projector_gap(Q, Q_t) < close
    assert (Q.transpose(-1, -2) @ Q - torch.eye(3, dtype=torch.float64, device="cuda")).abs().max() < 1e-12
    # A tol nothing falls by more than: both stop at the first test that has a previous estimate, block 2.
    assert cuda_backend.krylov_ritz(L, start, 3, 8, 1e9)[2] == torch_backend.krylov_ritz(L, start, 3, 8, 1e9)[2] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["auto", "float64"])
def test_gpu_end_to_end_agrees_with_torch_backend_and_eigh(precision):
    C, V = gapped_batch(3, 400, 8, torch.float32)
    values, Q, _ = null_space.smallest_eigenpairs(C.cuda(), 8, **dict(OPTIONS, precision=precision))
    with backend.use("torch"):
        values_t, Q_t, _ = null_space.smallest_eigenpairs(C.cuda(), 8, **dict(OPTIONS, precision=precision))
    assert values.device.type == "cuda" and Q.shape == (3, 400, 8)
    # The spectrum of test_nullspace.py's gapped test: float32 rounding of C is ~eps · ‖C‖ = 6e-8, the size of the
    # smallest eigenvalues, so float32 factorisations differ at 1e-6 and the subspaces at ~1e-3.
    assert projector_gap(Q, V) < 1e-2 and projector_gap(Q, Q_t) < (1e-2 if precision == "auto" else 1e-6)
    exact = torch.linalg.eigvalsh(C.double())[:, :8]
    assert (values.cpu() - exact).abs().max() < 1e-5 and (values - values_t).abs().max() < 1e-5


@pytest.mark.gpu
def test_gpu_float32_fallback_and_ridge_match_the_torch_backend():
    C, _ = known_covariance(128, torch.cat([torch.full((4,), -1e-5), torch.ones(124)]).double())
    values, Q, _ = null_space.smallest_eigenpairs(C.float().cuda(), 4, **OPTIONS)
    with backend.use("torch"):
        values_t, Q_t, _ = null_space.smallest_eigenpairs(C.float().cuda(), 4, **OPTIONS)
    assert values.max() < 0 and (values - values_t).abs().max() < 1e-9 and projector_gap(Q, Q_t) < 1e-6
    with pytest.raises(ValueError, match="positive semi-definite"):
        null_space.smallest_eigenpairs(torch.diag(torch.tensor([-10.0] + [1.0] * 63)).cuda(), 4, **OPTIONS)


@pytest.mark.gpu
def test_gpu_leak_within_1_1x_of_eigh_on_held_out_heavy_tailed_activations():
    n, k = 512, 24
    X, held = heavy_tailed(n, 2048, seed=3)
    C = (X.t() @ X / X.shape[0]).cuda()
    _, exact = nullspace.smallest_eigenvectors(C, k, method="eigh")
    _, fast, _ = null_space.smallest_eigenpairs(C, k, **OPTIONS)
    exact_leak = nullspace.leak(held.cuda(), exact.t())
    fast_leak = nullspace.leak(held.cuda(), fast.float().t())
    assert fast_leak <= 1.1 * exact_leak


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream():
    C, _ = gapped_batch(2, 300, 6, torch.float32)
    C = C.cuda()
    expected = null_space.smallest_eigenpairs(C, 6, **OPTIONS)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = null_space.smallest_eigenpairs(C, 6, **OPTIONS)
    side.synchronize()
    assert (got[0] - expected[0]).abs().max() < 1e-12 and projector_gap(got[1], expected[1]) < 1e-9
