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
        (lambda: nullspace.eigh_ascending(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), "^C has NaN or Inf"),
        (lambda: nullspace.eigh_ascending(torch.stack([torch.eye(2), torch.full((2, 2), float("inf"))])),
         r"^C\[1\] has NaN or Inf"),
        (lambda: nullspace.precomputed([(torch.eye(2), torch.eye(2))]), "triples"),
        (lambda: nullspace.pick_method(600, "8"), "k must be an int"),
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


# ---- the randomized solver (block Krylov iteration on C⁻¹) -------------------------------------------------------

def heavy_tailed(n, tokens, seed):
    """Calibration and held-out activations sharing a rotated ``i^-1`` feature spectrum (float32, like calibration)."""
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    scales = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    draw = lambda: ((torch.randn(tokens, n, generator=g, dtype=torch.float64) * scales) @ R.t()).float()  # noqa: E731
    return draw(), draw()


def test_randomized_matches_eigh_on_a_gapped_spectrum_and_is_batched():
    n, k = 200, 6
    lam = torch.cat([torch.logspace(-7, -6, k, dtype=torch.float64), torch.logspace(-3, 0, n - k, dtype=torch.float64)])
    C, V = known_covariance(n, lam)
    C32 = C.float()  # the float32 rounding makes C indefinite near 1e-7 · ‖C‖: the ridge copes
    values, Q = nullspace.smallest_eigenvectors(C32, k, method="randomized")
    assert Q.shape == (n, k) and Q.dtype == torch.float32 and values.shape == (k,)
    assert (Q.double().t() @ Q.double() - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-5
    P_true = V[:, :k] @ V[:, :k].t()
    assert (Q.double() @ Q.double().t() - P_true).abs().max() < 1e-2
    assert torch.all(values[1:] >= values[:-1]) and values.max() < 1e-5
    _, Q64 = nullspace.randomized_smallest(C32, k, precision="float64")  # "auto" ran in float32 here
    assert (Q64 @ Q64.t() - P_true).abs().max() < 1e-2
    both_v, both_Q = nullspace.smallest_eigenvectors(torch.stack([C32, 3 * C32]), k, method="randomized")
    assert both_Q.shape == (2, n, k)
    assert torch.allclose(both_Q[0], Q, atol=1e-6), "a batch entry is solved as on its own (same seed)"
    assert (both_v[1] - 3 * both_v[0]).abs().max() < 1e-7  # float32 rounding of C: ~eps · ‖C‖ = 6e-8


def test_randomized_leak_within_1_1x_of_eigh_on_held_out_heavy_tailed_activations():
    n, k = 256, 16
    X, held = heavy_tailed(n, 1024, seed=3)
    C = X.t() @ X / X.shape[0]
    _, exact = nullspace.smallest_eigenvectors(C, k, method="eigh")
    _, fast = nullspace.smallest_eigenvectors(C, k, method="randomized")
    exact_leak, fast_leak = nullspace.leak(held, exact.t()), nullspace.leak(held, fast.t())
    random_leak = nullspace.leak(held, torch.randn(k, n, generator=torch.Generator().manual_seed(0)))
    assert fast_leak <= 1.1 * exact_leak and exact_leak < 1e-2 * random_leak


def test_auto_picks_eigh_for_small_matrices_and_wide_sketches():
    assert nullspace.pick_method(256, 8) == "eigh"
    assert nullspace.pick_method(4096, 128) == "randomized"
    assert nullspace.pick_method(4096, 1500) == "eigh"
    C, _ = known_covariance(48, torch.linspace(0.1, 1, 48, dtype=torch.float64))
    auto, eigh = nullspace.smallest_eigenvectors(C, 4), nullspace.smallest_eigenvectors(C, 4, method="eigh")
    assert torch.equal(auto[1], eigh[1])


def test_ridge_grows_until_the_factorisation_succeeds_and_far_from_psd_is_an_error():
    C, _ = known_covariance(64, torch.cat([torch.full((4,), -1e-5), torch.ones(60)]).double())
    values, Q = nullspace.smallest_eigenvectors(C, 4, method="randomized", dtype=torch.float64)
    assert values.max() < 0 and Q.shape == (64, 4)  # Ritz values come from C itself, not the ridged copy
    with pytest.raises(ValueError, match="positive semi-definite"):
        nullspace.smallest_eigenvectors(torch.diag(torch.cat([torch.tensor([-10.0]), torch.ones(63)])), 4,
                                        method="randomized")
    with pytest.raises(ValueError, match="tr"):
        nullspace.smallest_eigenvectors(torch.zeros(64, 64), 4, method="randomized")
    with pytest.raises(ValueError, match="method"):
        nullspace.smallest_eigenvectors(torch.eye(64), 4, method="lanczos")
    with pytest.raises(ValueError, match="precision"):
        nullspace.randomized_smallest(torch.eye(64), 4, precision="half")


def test_precomputed_bases_are_reused_by_identity_only():
    C, _ = known_covariance(32, torch.linspace(0.1, 1, 32, dtype=torch.float64))
    values, Q = torch.arange(8.0), torch.zeros(32, 8)
    with nullspace.precomputed([(C, values, Q)]):
        hit = nullspace.smallest_eigenvectors(C, 3)
        miss = nullspace.smallest_eigenvectors(C.clone(), 3)
        too_many = nullspace.smallest_eigenvectors(C, 9)
    assert torch.equal(hit[0], values[:3]) and torch.equal(hit[1], Q[:, :3])
    assert miss[1].abs().sum() > 0 and too_many[1].shape == (32, 9)
    assert nullspace.smallest_eigenvectors(C, 3)[1].abs().sum() > 0, "nothing left behind after the block"


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (600, 400)])
def test_minor_singular_components_by_gram_and_randomized(shape):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g, dtype=torch.float64) / 15
    U, S, Vh = nullspace.minor_singular_components(W, 5, method="randomized")
    Ue, Se, Vhe = nullspace.minor_singular_components(W, 5, method="eigh")
    assert U.shape == (shape[0], 5) and Vh.shape == (5, shape[1]) and torch.all(S[:-1] >= S[1:])
    assert (S - Se).abs().max() < 1e-6 * Se.max()
    assert torch.linalg.svdvals(Vh @ Vhe.t()).min() > 0.999  # principal angles ≈ 0
    assert (U.t() @ U - torch.eye(5, dtype=torch.float64)).abs().max() < 1e-10


def test_minor_singular_components_of_a_rank_deficient_weight():
    W = torch.randn(120, 3, dtype=torch.float64) @ torch.randn(3, 100, dtype=torch.float64)
    U, S, Vh = nullspace.minor_singular_components(W, 4, method="randomized")
    assert S.abs().max() < 1e-10 and torch.isfinite(U).all()
    assert (U.t() @ U - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-8
    assert (W @ Vh.t()).abs().max() < 1e-10


def test_randomized_refuses_an_indefinite_matrix_and_auto_falls_back_to_eigh():
    """One eigenvalue of -0.05: the ridge that lets the Cholesky factor it made the randomized answer wrong (about
    half the eigenvalue, vectors far from eigh's) without an error."""
    n, k = 600, 8
    C, V = known_covariance(n, torch.cat([torch.tensor([-0.05]), torch.logspace(-3, 0, n - 1)]).double())
    with pytest.raises(nullspace.NotPositiveSemidefiniteError, match=r"C is not positive semi-definite: an eigenvalue"):
        nullspace.smallest_eigenvectors(C.float(), k, method="randomized")
    with pytest.raises(ValueError, match=r"C\[1\] is not positive semi-definite"):
        nullspace.randomized_smallest(torch.stack([C.abs() @ C.abs(), C]).float(), k)
    values, Q = nullspace.smallest_eigenvectors(C.float(), k)  # auto: n ≥ 512 would be randomized
    exact = V[:, :k].float()
    assert values[0].item() == pytest.approx(-0.05, rel=1e-4)
    assert torch.linalg.svdvals(Q.t() @ exact).min() > 0.999, "the eigh subspace"


@pytest.mark.parametrize("kw, message", [
    (dict(ridge=float("inf")), "ridge must be a finite number > 0, got inf"),
    (dict(ridge=0.0), "ridge must be a finite number > 0, got 0.0"),
    (dict(ridge=-1e-6), "ridge must be a finite number > 0"),
    (dict(ridge=float("nan")), "ridge must be a finite number > 0, got nan"),
    (dict(seed="abc"), "seed must be None or an int .* got 'abc'"),
    (dict(seed=2**70), "seed must be None or an int"),
    (dict(seed=1.5), "seed must be None or an int"),
    (dict(seed=True), "seed must be None or an int"),
    (dict(n_iter=0), "n_iter must be an int ≥ 1"),
    (dict(oversample=-1), "oversample must be an int ≥ 0"),
    (dict(tol=float("nan")), "tol must be a number ≥ 0"),
])
def test_solver_options_are_checked_by_name(kw, message):
    C, _ = known_covariance(64, torch.logspace(-3, 0, 64).double())
    with pytest.raises(ValueError, match=message):
        nullspace.randomized_smallest(C, 4, **kw)
    if "ridge" not in kw:  # the same checks whichever method runs
        with pytest.raises(ValueError, match=message):
            nullspace.smallest_eigenvectors(C, 4, method="eigh", **kw)


def test_the_failing_batch_entry_is_named():
    C, _ = known_covariance(64, torch.logspace(-3, 0, 64).double())
    with pytest.raises(ValueError, match=r"C\[1\] has tr\(C\) ≤ 0"):
        nullspace.randomized_smallest(torch.stack([C, torch.zeros(64, 64, dtype=C.dtype), C]), 4)
    bad = torch.stack([C, C])
    bad[1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"C\[1\] has NaN or Inf"):
        nullspace.randomized_smallest(bad, 4)


def test_non_finite_inputs_are_named():
    W = torch.randn(50, 40)
    W[3, 2] = float("nan")
    X = torch.randn(7, 40)
    for call, name in ((lambda: nullspace.minor_singular_components(W, 4), "W"),
                       (lambda: nullspace.minor_singular_components(W, 4, method="randomized"), "W"),
                       (lambda: nullspace.row_space_basis(W), "A"),
                       (lambda: nullspace.leak(X, W), "A"),
                       (lambda: nullspace.leak(W, torch.randn(3, 40)), "X"),
                       (lambda: nullspace.energy_fraction(W.t() @ W, torch.eye(40)[:, :3]), "C"),
                       (lambda: nullspace.energy_fraction(torch.eye(50), W[:, :3]), "Q")):
        with pytest.raises(ValueError, match=f"^{name} has NaN or Inf entries"):
            call()


def test_energy_fraction_refuses_a_basis_that_is_not_orthonormal():
    """An adapter's A passed as Q gave a "fraction" far above 1."""
    C, _ = known_covariance(16, torch.logspace(-2, 0, 16).double())
    A = torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="orthonormal columns .*row_space_basis"):
        nullspace.energy_fraction(C, A.t())
    assert 0 <= nullspace.energy_fraction(C, nullspace.row_space_basis(A)) <= 1
