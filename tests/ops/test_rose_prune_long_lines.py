"""RoseLoRA's prune kernel on lines longer than it holds in registers: the streamed path (chunked EMA, bisection
passes over the stored importance, ties cut inside the chunk where the need runs out) chooses exactly what the torch
fallback chooses. ``MAX_BLOCK`` is lowered so that lines of a few dozen entries take that path under the
interpreter; the GPU launch takes it above 8192 entries (Llama-7B's 11008-wide down_proj)."""
import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.ops.rose_prune import triton_backend as rose_ops
from loranull_kernels.ops.rose_prune import RoseTensors, rose_prune_

from ..conftest import DEVICE

CHUNK = 32  # lines longer than 2 * CHUNK are streamed in chunks of CHUNK


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(rose_ops, "MAX_BLOCK", 2 * CHUNK)


def _factor(rows, cols, dtype, line_dim):
    """(param, grad) whose lines (along ``line_dim``) hold, in index order spread over every chunk: exact zeros of
    importance (zero gradient), a tie group of importance 0.5, and larger distinct values (|p|, |g| ≥ 1), in
    alternating runs of 4 columns: a cut one column off inside a run of ties changes the mask."""
    p = (torch.rand(rows, cols, device=DEVICE) + 1.0) * torch.where(torch.rand(rows, cols, device=DEVICE) > 0.5, 1, -1)
    g = torch.rand(rows, cols, device=DEVICE) + 1.0
    idx = torch.arange(cols if line_dim == 1 else rows, device=DEVICE)
    shape = (1, -1) if line_dim == 1 else (-1, 1)
    run = (idx // 4) % 3
    zero, tie = (run == 0).view(shape), (run == 1).view(shape)
    g = torch.where(zero, 0.0, g)
    p, g = torch.where(tie, 1.0, p), torch.where(tie, 0.5, g)
    return p.to(dtype), g.to(dtype)


def _run(backend, A, B, grads, n_prune_A, n_prune_B, clamp):
    a, b = A.clone(), B.clone()
    ia, ib = torch.zeros(a.shape, device=DEVICE), torch.zeros(b.shape, device=DEVICE)
    ma = torch.zeros(a.shape, dtype=torch.bool, device=DEVICE)
    mb = torch.zeros(b.shape, dtype=torch.bool, device=DEVICE)
    count = torch.zeros((), dtype=torch.int64, device=DEVICE)
    with lk.backend.use(backend):
        for step, (ga, gb) in enumerate(grads):  # the EMA's first update, then a decayed one that prunes
            rose_prune_(count, 0.8, RoseTensors(a, ga, ia, ma), RoseTensors(b, gb, ib, mb), n_prune_A=n_prune_A,
                        n_prune_B=n_prune_B, prune=step == 1, clamp=clamp)
            count += 1
    return a, b, ia, ib, ma, mb


def _counts(n):
    """Where the n_prune-th smallest importance falls on a line of n built by ``_factor``: nothing, inside the zeros,
    at the end of the zeros, inside the 0.5 ties, at their end, among the distinct values, everything."""
    run = torch.arange(n) // 4 % 3
    zeros, ties = int((run == 0).sum()), int((run == 1).sum())
    return [0, zeros // 2, zeros, zeros + ties // 2 + 1, zeros + ties, zeros + ties + 3, n]


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (3, 100, 70)), (torch.bfloat16, (3, 100, 70)),
                                          (torch.float32, (2, 100, 20))],
                         ids=["fp32-both-streamed", "bf16-both-streamed", "fp32-A-streamed-B-in-registers"])
def test_streamed_lines_match_the_torch_fallback(dtype, shape):
    r, n_in, n_out = shape
    assert rose_ops._launch_block(n_in) == (CHUNK, True)
    assert rose_ops._launch_block(n_out)[1] == (n_out > 2 * CHUNK)
    A0, _ = _factor(r, n_in, dtype, 1)
    B0, _ = _factor(n_out, r, dtype, 0)
    grads = [(_factor(r, n_in, dtype, 1)[1], _factor(n_out, r, dtype, 0)[1]) for _ in range(2)]
    for i, (k_a, k_b) in enumerate(zip(_counts(n_in), _counts(n_out))):
        clamp = 1.5 if i % 2 else None
        want = _run("torch", A0, B0, grads, k_a, k_b, clamp)
        got = _run("triton", A0, B0, grads, k_a, k_b, clamp)
        for x, y, what in zip(got, want, ("A", "B", "imp_A", "imp_B", "mask_A", "mask_B")):
            assert torch.equal(x, y), f"{what}, n_prune = ({k_a}, {k_b})"
        assert (want[4].sum(1) == n_in - k_a).all() and (want[5].sum(0) == n_out - k_b).all()


def test_streamed_lines_with_random_importances_and_strided_B():
    """No ties, a B that is a transposed view (its lines contiguous), odd lengths that leave a short last chunk."""
    r, n_in, n_out = 4, 77, 69
    A0 = torch.randn(r, n_in, device=DEVICE)
    B0 = torch.randn(r, n_out, device=DEVICE).t()
    grads = [(torch.randn(r, n_in, device=DEVICE), torch.randn(r, n_out, device=DEVICE).t()) for _ in range(2)]
    want = _run("torch", A0, B0, grads, 50, 13, 0.7)
    got = _run("triton", A0, B0, grads, 50, 13, 0.7)
    for x, y, what in zip(got, want, ("A", "B", "imp_A", "imp_B", "mask_A", "mask_B")):
        assert torch.equal(x, y), what
