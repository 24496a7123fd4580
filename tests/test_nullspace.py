"""Null-space helpers on covariances with a known eigendecomposition."""
import pytest
import torch

from loranull_kernels import nullspace


def known_covariance(n, eigenvalues):
    V = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    return (V * eigenvalues) @ V.t(), V


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_eigh_ascending_recovers_the_spectrum(dtype, tol):
    lam = torch.rand(37, dtype=torch.float64) * 10 + 0.1
    C, _ = known_covariance(37, lam)
    values, vectors = nullspace.eigh_ascending(C.float() if dtype == torch.float32 else C, dtype=dtype)
    assert values.dtype == vectors.dtype == dtype
    assert torch.all(values[1:] >= values[:-1])
    assert (values.double() - lam.sort().values).abs().max() < tol * 10
    assert (C @ vectors.double() - vectors.double() * values.double()).abs().max() < tol * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smallest_eigenvectors_span_the_null_space(dtype):
    n, k = 41, 6
    lam = torch.cat([torch.rand(k, dtype=torch.float64) * 1e-3, 1 + torch.rand(n - k, dtype=torch.float64)])
    C, V = known_covariance(n, lam)
    values, Q = nullspace.smallest_eigenvectors(C, k, dtype=dtype)
    assert Q.shape == (n, k) and values.shape == (k,) and Q.dtype == dtype
    P_true = V[:, :k] @ V[:, :k].t()
    assert (Q.double() @ Q.double().t() - P_true).abs().max() < 1e-4
    assert torch.all(values[1:] >= values[:-1]) and values.max() < 2e-3


def test_half_precision_covariance_is_decomposed_in_float32():
    C, _ = known_covariance(16, torch.linspace(1, 2, 16, dtype=torch.float64))
    values, Q = nullspace.smallest_eigenvectors(C.to(torch.bfloat16), 3)
    assert values.dtype == Q.dtype == torch.float32


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: nullspace.smallest_eigenvectors(torch.eye(4), 5), "k must be"),
        (lambda: nullspace.smallest_eigenvectors(torch.eye(4), 0), "k must be"),
        (lambda: nullspace.eigh_ascending(torch.ones(3, 4)), "square"),
        (lambda: nullspace.eigh_ascending(torch.eye(3), dtype=torch.float16), "dtype"),
        (lambda: nullspace.eigh_ascending(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), "non-finite"),
        (lambda: nullspace.energy_fraction(torch.eye(4), torch.eye(3)), "Q must be"),
        (lambda: nullspace.energy_fraction(torch.zeros(4, 4), torch.eye(4)[:, :2]), "tr"),
        (lambda: nullspace.leak(torch.randn(5, 4), torch.randn(2, 3)), "A must be"),
    ],
)
def test_bad_input_is_a_clear_error(call, word):
    with pytest.raises((ValueError, TypeError), match=word):
        call()


def test_row_space_basis_handles_rank_deficiency():
    A = torch.randn(5, 3, dtype=torch.float64) @ torch.randn(3, 20, dtype=torch.float64)  # rank 3
    Q = nullspace.row_space_basis(A)
    assert Q.shape == (20, 3)
    assert (Q.t() @ Q - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-12
    assert (A - A @ Q @ Q.t()).abs().max() < 1e-10
    assert nullspace.row_space_basis(torch.zeros(2, 7)).shape == (7, 0)


def test_energy_fraction_of_eigenvectors_and_of_everything():
    lam = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    C, V = known_covariance(6, lam)
    assert nullspace.energy_fraction(C, V[:, :2]) == pytest.approx(1.5 / lam.sum().item(), rel=1e-10)
    assert nullspace.energy_fraction(C.float(), V.float()) == pytest.approx(1.0, rel=1e-5)


def test_leak_is_the_energy_fraction_of_the_row_space_and_scale_free():
    X = torch.randn(200, 24, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    A = torch.randn(4, 24, dtype=torch.float64)
    value = nullspace.leak(X, A)
    assert value == pytest.approx(nullspace.energy_fraction(X.t() @ X, nullspace.row_space_basis(A)), rel=1e-10)
    assert nullspace.leak(3 * X.reshape(8, 25, 24), 7 * A) == pytest.approx(value, rel=1e-10)
    assert 0 < value < 1


def test_null_space_adapter_leaks_far_less_than_a_random_one():
    n, r = 32, 4
    scales = torch.logspace(-3, 0, n, dtype=torch.float64)
    X = torch.randn(4000, n, dtype=torch.float64) * scales[torch.randperm(n)]
    C = X[:2000].t() @ X[:2000]  # calibrate on one half, measure on the other
    _, Q = nullspace.smallest_eigenvectors(C, r, dtype=torch.float64)
    held_out = X[2000:]
    isotropic = torch.randn(4000, n, dtype=torch.float64)
    random_A = torch.randn(r, n, dtype=torch.float64)
    assert nullspace.leak(isotropic, random_A) == pytest.approx(r / n, abs=0.03)
    assert nullspace.leak(held_out, Q.t()) < 1e-3 * nullspace.leak(held_out, random_A)
