"""Tiny adapter models and a training loop shared by the tests of the method pieces (KaSA, RoseLoRA, LaLoRA)."""
from __future__ import annotations

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.nn import LoRALinear


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: on tiny tensors a second OpenMP thread only adds wake-up latency (tens of ms per
    op on the shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def covariance(in_f: int, rank: int = 6, n: int = 256, dtype=torch.float64) -> torch.Tensor:
    """An input covariance with a clear null space (activations in a rank-``rank`` subspace)."""
    feats = torch.randn(n, rank, dtype=dtype) @ torch.randn(rank, in_f, dtype=dtype)
    return feats.t() @ feats / n


def two_layer(config: lk.AdapterConfig, dims=(20, 16, 12), dtype=torch.float32) -> torch.nn.Sequential:
    """``LoRALinear → tanh → LoRALinear`` built with ``from_linear`` (calibrated methods get a covariance)."""
    layers = []
    for i in range(len(dims) - 1):
        lin = torch.nn.Linear(dims[i], dims[i + 1]).to(dtype)
        cov = covariance(dims[i]) if config.needs_calibration else None
        layers.append(LoRALinear.from_linear(lin, config=config, covariance=cov))
        layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers[:-1])


def regression_task(dims=(20, 16, 12), n=48, dtype=torch.float32, seed=0):
    """Inputs and targets of a fixed random two-layer teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dims[0], generator=g, dtype=dtype)
    w1 = torch.randn(dims[1], dims[0], generator=g, dtype=dtype) / dims[0] ** 0.5
    w2 = torch.randn(dims[2], dims[1], generator=g, dtype=dtype) / dims[1] ** 0.5
    return x, torch.tanh(x @ w1.t()) @ w2.t()


def train(model, x, y, steps=20, lr=1e-2, micro_batches=1, regularize=True, sparsify=True):
    """Adam on MSE (+ ``regularization_loss``), ``after_optimizer_step`` after each step; returns the task losses
    before each step."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            task = torch.nn.functional.mse_loss(model(xb), yb)
            loss = task + lk.regularization_loss(model) if regularize else task
            (loss / micro_batches).backward()
            total += task.item() / micro_batches
        losses.append(total)
        opt.step()
        if sparsify:
            lk.after_optimizer_step(model, step)
    return losses
