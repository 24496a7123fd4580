"""LoRA-Null's initialiser: the adapter lives in the null space of the calibration activations."""
import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.nn import LoRALinear

from ..helpers import assert_close


def low_rank_activations(n, in_f, rank, generator=None):
    """Activations confined (up to small noise) to a `rank`-dimensional subspace: a meaningful null space."""
    basis = torch.randn(rank, in_f, generator=generator, dtype=torch.float64)
    return torch.randn(n, rank, generator=generator, dtype=torch.float64) @ basis + 1e-3 * torch.randn(n, in_f, generator=generator, dtype=torch.float64)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    in_f, out_f, r = 48, 40, 6
    X = low_rank_activations(512, in_f, 24, g)
    C = X.t() @ X / X.shape[0]
    lin = torch.nn.Linear(in_f, out_f).double()
    return lin, C, r, g


def _smallest(C, k):
    return torch.linalg.eigh(C).eigenvectors[:, :k]


def test_output_unchanged_and_base_is_projected(setup):
    lin, C, r, _ = setup
    layer = LoRALinear.from_linear(lin, r=r, alpha=2 * r, method="lora_null", covariance=C)
    x = torch.randn(9, 48, dtype=torch.float64)
    assert_close(layer(x), lin(x).detach(), torch.float64, "output", tol=1e-12)
    Q = _smallest(C, r)
    W = lin.weight.detach()
    assert_close(layer.weight, W - W @ Q @ Q.t(), torch.float64, "W_base = W (I - QQᵀ)", tol=1e-10)
    A = layer.lora_A.detach()
    assert_close(A @ Q @ Q.t(), A, torch.float64, "rows of A0 in span(Q)", tol=1e-10)


def test_adapter_input_is_nearly_zero_on_calibration_like_data(setup):
    lin, C, r, g = setup
    held_out = low_rank_activations(200, 48, 24, torch.Generator().manual_seed(0))  # same subspace as C
    layer = LoRALinear.from_linear(lin, r=r, alpha=2 * r, method="lora_null", covariance=C)
    plain = LoRALinear.from_linear(lin, r=r, alpha=2 * r, method="lora")
    def energy(A):  # fraction of the inputs' energy inside A's row space
        Qa = torch.linalg.qr(A.detach().t()).Q
        return (held_out @ Qa).square().sum() / held_out.square().sum()
    assert energy(layer.lora_A) < 1e-4
    assert 0.2 * r / 48 < energy(plain.lora_A) < 5 * r / 48


def test_null_dim_larger_than_r(setup):
    lin, C, r, _ = setup
    layer = LoRALinear.from_linear(lin, r=r, alpha=2 * r, method="lora_null", covariance=C, null_dim=3 * r)
    x = torch.randn(5, 48, dtype=torch.float64)
    assert_close(layer(x), lin(x).detach(), torch.float64, "output", tol=1e-12)
    Q = _smallest(C, 3 * r)
    W = lin.weight.detach()
    U, S, Vh = torch.linalg.svd(W @ Q @ Q.t())
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    assert_close(delta, (U[:, :r] * S[:r]) @ Vh[:r], torch.float64, "top-r SVD of W Q Qᵀ", tol=1e-9)


def test_basis_mode(setup):
    lin, C, r, _ = setup
    layer = LoRALinear.from_linear(lin, r=r, method="lora_null", covariance=C, lora_null_init="basis")
    Q = _smallest(C, r)
    A = layer.lora_A.detach()
    assert_close(A @ A.t(), torch.eye(r, dtype=torch.float64), torch.float64, "A0 orthonormal rows", tol=1e-10)
    assert_close(A.t() @ A, Q @ Q.t(), torch.float64, "span(A0ᵀ) = span(Q)", tol=1e-8)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert torch.equal(layer.weight, lin.weight)


def test_v2_updates_stay_in_the_null_space(setup):
    lin, C, r, _ = setup
    with lk.backend.use("torch"):
        layer = LoRALinear.from_linear(lin, r=r, alpha=2 * r, method="lora_null", covariance=C, freeze_A=True)
        opt = torch.optim.SGD([layer.lora_B], lr=0.1)
        x = torch.randn(32, 48, dtype=torch.float64)
        for _ in range(3):
            opt.zero_grad()
            layer(x).square().sum().backward()
            opt.step()
    A0 = layer.lora_A0.double()
    assert torch.equal(layer.lora_A.detach(), A0), "A did not move"
    Q = _smallest(C, r)
    delta = layer.delta_weight() - layer.scaling * layer.lora_B0.double() @ A0
    assert_close(delta @ Q @ Q.t(), delta, torch.float64, "ΔW row space in span(Q)", tol=1e-9)


def test_bad_covariance(setup):
    lin, _, r, _ = setup
    with pytest.raises(ValueError, match="covariance must be"):
        LoRALinear.from_linear(lin, r=r, method="lora_null", covariance=torch.eye(47, dtype=torch.float64))
