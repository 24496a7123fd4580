"""The torch backend's seeded dropout (:mod:`loranull_kernels.ops.lora_linear.sparse_dropout`): every bit of the seed counts, and
tiny probabilities draw gaps past any integer type without wrapping around."""
import torch

import loranull_kernels as lk
from loranull_kernels.ops.lora_linear import sparse_dropout

CPU = torch.device("cpu")


def test_seed_high_bits_change_the_mask():
    """The CPU generator keeps 32 bits of a seed: 1 and 1 + 2**32 drew the same mask."""
    base = sparse_dropout.keep_mask(1, 16, 32, 0.3, CPU)
    for high in (2**32, 2**40, 2**62):
        assert not torch.equal(base, sparse_dropout.keep_mask(1 + high, 16, 32, 0.3, CPU)), high
    # halves swapped are different seeds too
    a = sparse_dropout.keep_mask(5 + (7 << 32), 16, 32, 0.5, CPU)
    assert not torch.equal(a, sparse_dropout.keep_mask(7 + (5 << 32), 16, 32, 0.5, CPU))


def test_seed_high_bits_keep_the_rate_and_the_same_mask_in_backward():
    keep = sparse_dropout.keep_mask(3 + (9 << 40), 400, 500, 0.3, CPU).double().mean().item()
    assert abs(keep - 0.7) < 0.01  # 200,000 Bernoulli draws: σ ≈ 0.001
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    W, B = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    A = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    seed = 11 + 2**50
    with lk.backend.use("torch"):
        y = lk.lora_linear(x, W, A, B, 1.0, dropout_p=0.4, seed=seed)
    km = lk.ops.lora_linear.keep_mask(seed, 6, 10, 0.4, "cpu", "torch")
    xd = x * km / 0.6
    expected = x @ W.t() + (xd @ A.t()) @ B.t()
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    dx, dA = torch.autograd.grad(y, (x, A), g)
    ex, eA = torch.autograd.grad(expected, (x, A), g)
    torch.testing.assert_close(dx, ex)
    torch.testing.assert_close(dA, eA)


def test_tiny_dropout_probability_stays_in_range():
    """p = 1e-9 draws gaps of ~1e9 and beyond: an int32 running sum wrapped to negative positions (IndexError)."""
    for seed in range(64):
        d = sparse_dropout.dropped_entries(seed, 8, 16, 1e-9, CPU)
        assert d.flat.numel() == 0 or (int(d.flat.min()) >= 0 and int(d.flat.max()) < 128)
    x, W, A, B = torch.randn(8, 16), torch.randn(12, 16), torch.randn(4, 16, requires_grad=True), torch.randn(12, 4)
    with lk.backend.use("torch"):
        for seed in range(16):
            y = lk.lora_linear(x, W, A, B, 1.0, dropout_p=1e-9, seed=seed)
            torch.testing.assert_close(y, lk.lora_linear(x, W, A, B, 1.0))
        y.sum().backward()
    assert torch.isfinite(A.grad).all()


def test_positions_are_sorted_distinct_and_in_range_for_large_matrices():
    """Above 2**30 entries the indices switch to int64; the positions must still be exact."""
    d = sparse_dropout.dropped_entries(7, 2**15, 2**15 + 3, 1e-6, CPU)
    n = 2**15 * (2**15 + 3)
    assert d.flat.dtype == torch.int64 and d.rows.dtype == torch.int64
    assert int(d.flat.min()) >= 0 and int(d.flat.max()) < n
    assert bool((d.flat[1:] > d.flat[:-1]).all())
    assert torch.equal(d.rows * d.n_cols + d.cols, d.flat)


def test_high_dropout_has_no_cancellation():
    """At p = 0.9999 with every input dropped, ``(x Aᵀ − S Aᵀ)/(1 − p)`` left an adapter term of ~3e-2 instead of 0;
    above p = 0.5 the kept entries are multiplied directly, exactly 0 here."""
    x, W, B = torch.randn(8, 16), torch.randn(12, 16), torch.randn(12, 4)
    A = torch.randn(4, 16, requires_grad=True)
    seed = next(s for s in range(1000) if not sparse_dropout.keep_mask(s, 8, 16, 0.9999, CPU).any())
    with lk.backend.use("torch"):
        y = lk.lora_linear(x, W, A, B, 1.0, dropout_p=0.9999, seed=seed)
    assert torch.equal(y, torch.addmm(torch.zeros(8, 12), x, W.t()))
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A))
