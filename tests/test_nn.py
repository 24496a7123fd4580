"""LoRALinear: a drop-in nn.Linear whose forward is one lora_linear call."""
import math

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.nn import LoRALinear

from .helpers import assert_close

METHODS_NO_CALIB = ["lora", "pissa", "milora"]


def linear(in_f=40, out_f=30, dtype=torch.float32, bias=True):
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    return lin.to(dtype)


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def test_is_a_drop_in_for_linear():
    lin = linear()
    layer = LoRALinear.from_linear(lin, r=4, alpha=8)
    assert (layer.in_features, layer.out_features) == (40, 30)
    assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.bias, lin.bias)
    assert layer.weight.data_ptr() != lin.weight.data_ptr(), "weights are copied, not shared"
    x = torch.randn(2, 3, 40)
    assert torch.allclose(layer(x), lin(x), atol=1e-6), "LoRA's B = 0 leaves the output unchanged"
    assert layer.scaling == 2.0 and LoRALinear.from_linear(lin, r=4, alpha=8, use_rslora=True).scaling == 4.0
    text = repr(layer)
    assert "method=lora" in text and "r=4" in text and "alpha=8" in text


def test_trainable_set_and_frozen_base():
    layer = LoRALinear.from_linear(linear(), r=4)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    v2 = LoRALinear.from_linear(linear(), r=4, freeze_A=True, train_bias=True)
    assert {n for n, p in v2.named_parameters() if p.requires_grad} == {"lora_B", "bias"}
    assert "A frozen" in repr(v2)
    x = torch.randn(5, 40, requires_grad=True)
    v2(x).sum().backward()
    assert v2.lora_A.grad is None and v2.lora_B.grad is not None and v2.bias.grad is not None


@pytest.mark.parametrize("method", METHODS_NO_CALIB)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_output_unchanged_at_init(method, dtype):
    lin = linear(48, 36, dtype=dtype)
    x = torch.randn(7, 48, dtype=dtype)
    layer = LoRALinear.from_linear(lin, r=5, alpha=10, method=method)
    if dtype in (torch.bfloat16,):
        assert layer.lora_A.dtype == torch.float32, "half-precision bases keep float32 adapters (as PEFT)"
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert_close(layer(x), lin(x).detach(), dtype, f"{method} output", tol=tol)
    assert_close(layer.original_weight(), lin.weight.detach(), dtype, "original weight", tol=tol)


def test_init_seed_is_reproducible():
    a = LoRALinear.from_linear(linear(), r=4, init_seed=3).lora_A
    b = LoRALinear.from_linear(linear(), r=4, init_seed=3).lora_A
    c = LoRALinear.from_linear(linear(), r=4, init_seed=4).lora_A
    assert torch.equal(a, b) and not torch.equal(a, c)
    bound = math.sqrt(1.0 / 40)  # kaiming_uniform(a=√5) on fan_in = 40
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound


def test_milora_takes_minor_and_pissa_top_components():
    lin = linear(48, 36, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    r = 4
    # MiLoRA uses the exact SVD; PiSSA the randomized one (4 power iterations), approximate on this flat spectrum.
    for method, rows, tol in (("milora", Vh[-r:], 1e-9), ("pissa", Vh[:r], 2e-3)):
        layer = LoRALinear.from_linear(lin, r=r, alpha=2 * r, method=method)
        # A0's row space equals the chosen right singular vectors: projecting onto them changes nothing.
        A = layer.lora_A.detach()
        assert_close(A @ rows.t() @ rows, A, torch.float64, f"{method} A0 row space", tol=tol)
        base_S = torch.linalg.svdvals(layer.weight.detach())
        expected = S[:-r] if method == "milora" else S[r:]
        assert_close(base_S[: expected.numel()], expected, torch.float64, f"{method} residual spectrum", tol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_merge_unmerge_round_trip(dtype):
    layer = LoRALinear.from_linear(linear(dtype=dtype), r=4, method="milora")
    with torch.no_grad():
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
    layer.mask_A = torch.rand_like(layer.lora_A) > 0.5
    x = torch.randn(6, 40, dtype=dtype)
    before_w = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert "merged" in repr(layer)
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert_close(layer(x), y, dtype, "merged output", tol=tol)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert_close(layer.weight, before_w, dtype, "unmerged weight", tol=1e-14 if dtype == torch.float64 else 1e-2)


def test_merge_leaves_untouched_entries_bit_identical():
    layer = LoRALinear.from_linear(linear(dtype=torch.bfloat16), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.mask_B = torch.zeros_like(layer.lora_B, dtype=torch.bool)
    layer.mask_B[3] = True  # ΔW touches row 3 only
    before = layer.weight.detach().clone()
    layer.merge()
    changed = (layer.weight != before).any(dim=1)
    assert changed[3] and not changed[torch.arange(30) != 3].any()


def test_from_linear_errors():
    with pytest.raises(ValueError, match="r=31 exceeds"):
        LoRALinear.from_linear(linear(40, 30), r=31)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(3, 3, 1), r=1)
    with pytest.raises(ValueError, match="method='magic' is unknown"):
        LoRALinear.from_linear(linear(), r=2, method="magic")
    with pytest.raises(ValueError, match="needs the layer's input covariance"):
        LoRALinear.from_linear(linear(), r=2, method="lora_null")


def test_input_is_cast_to_base_dtype():
    layer = LoRALinear.from_linear(linear(dtype=torch.bfloat16), r=4)
    y = layer(torch.randn(3, 40))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("method", METHODS_NO_CALIB + ["lora_null"])
def test_a_few_steps_reduce_the_loss(method):
    torch.manual_seed(0)
    lin = linear(32, 24)
    cov = None
    if method == "lora_null":
        feats = torch.randn(256, 8) @ torch.randn(8, 32)
        cov = feats.t() @ feats / 256
    layer = LoRALinear.from_linear(lin, r=4, alpha=8, method=method, covariance=cov, dropout=0.1)
    target = torch.nn.Linear(32, 24)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(64, 32)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(layer(x), target(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
