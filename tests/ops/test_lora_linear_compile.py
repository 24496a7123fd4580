"""torch.compile(fullgraph=True) traces a model calling lora_linear without graph breaks, forward and backward,
and gives eager's loss and gradients."""
import pytest
import torch

import loranull_kernels as lk

from ..helpers import assert_close


class TinyAdapterNet(torch.nn.Module):
    def __init__(self, K=24, N=20, r=4, dropout_p=0.0):
        super().__init__()
        self.register_buffer("w1", torch.randn(N, K) / K**0.5)
        self.register_buffer("w2", torch.randn(K, N) / N**0.5)
        self.A1 = torch.nn.Parameter(torch.randn(r, K) / K**0.5)
        self.B1 = torch.nn.Parameter(torch.randn(N, r) * 0.1)
        self.d1 = torch.nn.Parameter(torch.randn(r))
        self.A2 = torch.nn.Parameter(torch.randn(r, N) / N**0.5)
        self.B2 = torch.nn.Parameter(torch.randn(K, r) * 0.1)
        self.dropout_p = dropout_p

    def forward(self, x):
        h = lk.lora_linear(x, self.w1, self.A1, self.B1, 2.0, rank_scale=self.d1, dropout_p=self.dropout_p, seed=7)
        h = torch.nn.functional.gelu(h)
        return lk.lora_linear(h, self.w2, self.A2, self.B2, 0.5, dropout_p=self.dropout_p, seed=8, train_A=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_compile_fullgraph_matches_eager(backend, dropout_p):
    torch._dynamo.reset()
    net = TinyAdapterNet(dropout_p=dropout_p)
    x = torch.randn(3, 5, 24)

    def loss_of(fn):
        net.zero_grad(set_to_none=True)
        loss = fn(x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    with lk.backend.use(backend):
        eager_loss, eager_grads = loss_of(net)
        compiled = torch.compile(net, fullgraph=True, backend="inductor")
        comp_loss, comp_grads = loss_of(compiled)
    assert_close(comp_loss, eager_loss, torch.float32, "loss")
    assert eager_grads.keys() == comp_grads.keys() and "A2" not in eager_grads
    for name in eager_grads:
        assert_close(comp_grads[name], eager_grads[name], torch.float32, f"grad {name}")


@pytest.mark.slow
def test_compile_with_drawn_seed_runs():
    """seed=None under compile: the seed is drawn inside the graph (a CPU tensor), not a graph break."""
    torch._dynamo.reset()
    w, A, B = torch.randn(8, 6), torch.randn(2, 6, requires_grad=True), torch.zeros(8, 2, requires_grad=True)
    with lk.backend.use("torch"):
        fn = torch.compile(lambda x: lk.lora_linear(x, w, A, B, 1.0, dropout_p=0.5), fullgraph=True)
        y = fn(torch.randn(5, 6))
    y.sum().backward()
    assert y.shape == (5, 8) and A.grad is not None
