"""lora_linear under torch.autocast: a float32 model trained in bf16/fp16 mixed precision (HF Trainer's bf16=True)
computes in the autocast dtype, as F.linear does there, and its float32 parameters get float32 gradients."""
import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import reference


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_casts_every_operand_like_f_linear(backend, dtype):
    torch.manual_seed(0)
    M, K, N, r = 13, 24, 20, 4
    x = torch.randn(M, K, requires_grad=True)
    W, bias = torch.randn(N, K) / K**0.5, torch.randn(N)
    A = (torch.randn(r, K) / K**0.5).requires_grad_()
    B = (torch.randn(N, r) * 0.1).requires_grad_()
    d = torch.rand(r).add_(0.5).requires_grad_()
    with lk.backend.use(backend), torch.autocast("cpu", dtype=dtype):
        y = lk.lora_linear(x, W, A, B, 2.0, bias=bias, rank_scale=d)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert x.grad.dtype == A.grad.dtype == B.grad.dtype == d.grad.dtype == torch.float32

    # The float64 reference on the operands rounded to the autocast dtype, as the op sees them.
    r64 = [t.detach().to(dtype).double().requires_grad_() for t in (x, A, B, d)]
    y64 = reference.lora_linear(r64[0], W.to(dtype).double(), r64[1], r64[2], 2.0, bias=bias.to(dtype).double(),
                                rank_scale=r64[3])
    y64.square().sum().backward()
    tol = 3e-2
    assert torch.allclose(y.double(), y64, rtol=tol, atol=tol * y64.abs().max().item())
    for got, want in zip((x.grad, A.grad, B.grad, d.grad), (t.grad for t in r64)):
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_layer_in_a_float32_model_trains_under_bf16_autocast():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    lk.inject(model, lk.AdapterConfig(method="lora", r=4, target_modules=["0", "2"], init_seed=0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(5, 16))  # the second layer receives bf16 activations, its weight is float32
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
