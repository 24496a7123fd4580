"""RoseLoRA: the schedule, the fused importance/selection pass (Triton under the interpreter vs the torch fallback vs a
plain reference), the row/column budgets, masked gradients, the sparse merge and export, gradient accumulation."""
import copy

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.methods import roselora
from loranull_kernels.nn import LoRALinear
from loranull_kernels.ops.rose_prune import RoseTensors, rose_prune_
from loranull_kernels.export.sparse_delta import apply_sparse_delta, export_sparse_delta, load_sparse_delta

from ..helpers import assert_close
from ..pieces_helpers import one_thread, regression_task, train, two_layer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(r=4, alpha=8, rose_keep=0.25, rose_t_init=2, rose_t_final=8)


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def test_schedule_matches_the_cubic_formula():
    cfg = lk.AdapterConfig(method="roselora", rose_keep=0.1, rose_t_init=3, rose_t_final=13)
    for t in range(20):
        if t < 3:
            expected = 1.0
        elif t < 13:
            expected = 0.1 + 0.9 * (1 - (t - 3) / 10) ** 3
        else:
            expected = 0.1
        assert roselora.keep_fraction(t, cfg) == pytest.approx(expected, rel=1e-15, abs=0), t
    assert roselora.keep_fraction(3, cfg) == 1.0 and roselora.keep_fraction(12, cfg) > 0.1
    assert roselora.n_pruned(40, 0.25) == 30 and roselora.n_pruned(4096, 0.05) == 3891
    assert roselora.n_pruned(7, 1.0) == 0 and roselora.n_pruned(7, 0.3) == 4


def _reference_lines(p, g, imp, first, ema, n_prune, prune, clamp):
    """The update of one factor whose rows are the lines, written out plainly (float64 importance math)."""
    p, imp = p.clone(), imp.clone()
    beta = 0.0 if first else ema
    imp = (imp.double() * beta + (p.double() * g.double()).abs() * (1 - beta)).float()
    mask = torch.ones_like(p, dtype=torch.bool)
    if prune:
        for i in range(p.shape[0]):
            order = sorted(range(p.shape[1]), key=lambda j: (imp[i, j].item(), j))
            for j in order[:n_prune]:
                mask[i, j] = False
        p = p.masked_fill(~mask, 0)
        if clamp is not None:
            p = p.clamp(-clamp, clamp)
    return p, imp, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("frozen_A", [False, True])
@pytest.mark.parametrize("clamp", [None, 0.4])
def test_fused_pass_matches_torch_fallback_and_reference(dtype, frozen_A, clamp):
    r, in_f, out_f = 5, 37, 70  # odd line lengths, one above a power of two
    A, B = torch.randn(r, in_f).to(dtype), torch.randn(out_f, r).to(dtype)
    grads = [(torch.randn(r, in_f).to(dtype), torch.randn(out_f, r).to(dtype)) for _ in range(2)]
    grads[1][0][:, ::3] = 0  # exact ties (zero importance), broken by index
    grads[1][1][::2] = 0
    results = {}
    for name in ("torch", "triton"):
        a, b = A.clone(), B.clone()
        state = [torch.zeros(r, in_f), torch.zeros(out_f, r), torch.zeros(r, in_f, dtype=torch.bool),
                 torch.zeros(out_f, r, dtype=torch.bool), torch.zeros((), dtype=torch.int64)]
        ia, ib, ma, mb, count = state
        with lk.backend.use(name):
            for step, (ga, gb) in enumerate(grads):
                prune = step == 1
                rose_prune_(count, 0.8, None if frozen_A else RoseTensors(a, ga, ia, ma), RoseTensors(b, gb, ib, mb),
                            n_prune_A=27, n_prune_B=51, prune=prune, clamp=clamp)
                count += 1
        results[name] = (a, b, ia, ib, ma, mb)
    for x, y, what in zip(results["torch"], results["triton"], ("A", "B", "imp_A", "imp_B", "mask_A", "mask_B")):
        assert torch.equal(x, y), f"triton vs torch: {what}"

    a, b, ia, ib, ma, mb = results["torch"]
    ref_a, ref_ia = A, torch.zeros(r, in_f)
    ref_b, ref_ib = B.t(), torch.zeros(r, out_f)
    for step, (ga, gb) in enumerate(grads):
        prune = step == 1
        if not frozen_A:
            ref_a, ref_ia, ref_ma = _reference_lines(ref_a, ga, ref_ia, step == 0, 0.8, 27, prune, clamp)
        ref_b, ref_ib, ref_mb = _reference_lines(ref_b, gb.t(), ref_ib, step == 0, 0.8, 51, prune, clamp)
    assert_close(ib, ref_ib.t(), torch.float32, "importance B", tol=1e-6)
    assert torch.equal(mb, ref_mb.t()) and torch.equal(b, ref_b.t())
    assert (mb.sum(0) == out_f - 51).all()
    if frozen_A:
        assert torch.equal(a, A) and not ma.any(), "a frozen A is neither scored nor masked"
    else:
        assert_close(ia, ref_ia, torch.float32, "importance A", tol=1e-6)
        assert torch.equal(ma, ref_ma) and torch.equal(a, ref_a)
        assert (ma.sum(1) == in_f - 27).all()


def test_masks_meet_the_budget_after_t_final():
    cfg = lk.AdapterConfig(method="roselora", rose_clamp=0.5, **CFG)
    model = two_layer(cfg)
    x, y = regression_task()
    train(model, x, y, steps=2)
    assert all(l.mask_A is None and l.mask_B is None for l in model if isinstance(l, LoRALinear)), \
        "no mask before t_i: the unmasked fast path"
    losses = train(model, x, y, steps=12)
    taus = lk.after_optimizer_step(model, 11)
    assert taus == {"0": 0.25, "2": 0.25}
    for layer in (model[0], model[2]):
        keep_row = layer.in_features - roselora.n_pruned(layer.in_features, 0.25)
        keep_col = layer.out_features - roselora.n_pruned(layer.out_features, 0.25)
        assert (layer.mask_A.sum(1) == keep_row).all(), layer.mask_A.sum(1)
        assert (layer.mask_B.sum(0) == keep_col).all(), layer.mask_B.sum(0)
        assert not layer.lora_A[~layer.mask_A].any() and not layer.lora_B[~layer.mask_B].any()
        assert layer.lora_A.abs().max() <= 0.5 and layer.lora_B.abs().max() <= 0.5
        support = (layer.delta_weight() != 0).sum().item()
        assert support <= layer.r * keep_row * keep_col, "density(BA) ≤ r·τ_A·τ_B"
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_entries_get_no_gradient_through_the_fused_op(backend):
    cfg = lk.AdapterConfig(method="roselora", **CFG)
    model = two_layer(cfg)
    x, y = regression_task()
    train(model, x, y, steps=10)
    layer = model[0]
    for p in (layer.lora_A, layer.lora_B):
        p.grad = None
    with torch.no_grad():  # values behind the masks that the op must ignore
        layer.lora_A[~layer.mask_A] = 5.0
        layer.lora_B[~layer.mask_B] = -5.0
    xs = x[:7]
    with lk.backend.use(backend):
        out = layer(xs)
        out.square().sum().backward()
    A = (layer.lora_A.detach().double() * layer.mask_A).requires_grad_()
    B = (layer.lora_B.detach().double() * layer.mask_B).requires_grad_()
    ref = xs.double() @ layer.weight.double().t() + layer.bias.double() + layer.scaling * (xs.double() @ A.t()) @ B.t()
    ref.square().sum().backward()
    assert_close(out, ref, torch.float32, "masked forward", tol=1e-4)
    assert not layer.lora_A.grad[~layer.mask_A].any() and not layer.lora_B.grad[~layer.mask_B].any()
    assert_close(layer.lora_A.grad, A.grad * layer.mask_A, torch.float32, "dA", tol=1e-4)
    assert_close(layer.lora_B.grad, B.grad * layer.mask_B, torch.float32, "dB", tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_merge_and_export_touch_only_the_support(tmp_path, dtype):
    cfg = lk.AdapterConfig(method="roselora", rose_clamp=0.5, **CFG)
    torch.manual_seed(3)
    lin = torch.nn.Linear(20, 16).to(dtype)
    original = torch.nn.Sequential(copy.deepcopy(lin))
    model = torch.nn.Sequential(LoRALinear.from_linear(lin, config=cfg))
    x, y = regression_task(dims=(20, 16, 16), dtype=dtype)
    train(model, x.float().to(dtype), y[:, :16], steps=12, lr=3e-2)
    layer = model[0]
    delta = layer.delta_weight()
    support = delta != 0
    assert 0 < support.sum() < support.numel() // 2, "a sparse update"
    counts = export_sparse_delta(model, tmp_path / "edit.safetensors")
    before = layer.weight.detach().clone()
    layer.merge()
    after = layer.weight.detach()
    assert torch.equal(after[~support], before[~support]), "entries outside ΔW's support are bit-identical"
    assert_close(after[support], (before.float() + delta)[support], dtype, "edited entries")
    assert counts == {"0": int(support.sum())}
    loaded = load_sparse_delta(tmp_path / "edit.safetensors")
    indices, values, shape = loaded["0"]
    assert shape == (16, 20) and torch.equal(indices, torch.nonzero(support))
    apply_sparse_delta(original, tmp_path / "edit.safetensors")
    assert torch.equal(original[0].weight, after), "applying the export to the original model = the merge"


def test_importance_comes_from_the_accumulated_gradient():
    cfg = lk.AdapterConfig(method="roselora", **CFG)
    torch.manual_seed(4)
    full = two_layer(cfg, dtype=torch.float64)
    accumulated = copy.deepcopy(full)
    x, y = regression_task(dtype=torch.float64)
    train(full, x, y, steps=6)
    train(accumulated, x, y, steps=6, micro_batches=3)
    for a, b in zip((full[0], full[2]), (accumulated[0], accumulated[2])):
        assert_close(a.rose_imp_A, b.rose_imp_A, torch.float32, "importance A", tol=1e-6)
        assert_close(a.rose_imp_B, b.rose_imp_B, torch.float32, "importance B", tol=1e-6)
        assert torch.equal(a.mask_A, b.mask_A) and torch.equal(a.mask_B, b.mask_B)
        assert int(a.rose_updates) == 6


def test_missing_gradient_names_the_parameter():
    model = two_layer(lk.AdapterConfig(method="roselora", **CFG))
    x, y = regression_task()
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].lora_A.grad = None
    with pytest.raises(RuntimeError, match=r"0\.lora_A has no gradient.*before optimizer.zero_grad"):
        lk.after_optimizer_step(model, 0)
    with pytest.raises(ValueError, match="step must be an int"):
        lk.after_optimizer_step(model, -1)


def test_on_a_milora_init_and_with_a_frozen_A():
    x, y = regression_task()
    cfg = lk.AdapterConfig(method="milora", sparsity="roselora", **CFG)
    model = two_layer(cfg)
    losses = train(model, x, y, steps=12)
    assert losses[-1] < losses[0]
    layer = model[0]
    assert (layer.mask_A.sum(1) == layer.in_features - roselora.n_pruned(layer.in_features, 0.25)).all()
    with pytest.raises(ValueError, match="rewrote the base"):
        export_sparse_delta(model, "unused.safetensors")

    v2 = two_layer(lk.AdapterConfig(method="lora_null", freeze_A=True, sparsity="roselora", **CFG))
    A0 = v2[0].lora_A.detach().clone()
    losses = train(v2, x, y, steps=12)
    assert v2[0].mask_A is None and v2[0].mask_B is not None, "only the trained factor is masked"
    assert torch.equal(v2[0].lora_A, A0) and losses[-1] < losses[0]


def test_milora_plus_roselora_output_unchanged_at_init():
    lin = torch.nn.Linear(20, 16).double()
    layer = LoRALinear.from_linear(lin, config=lk.AdapterConfig(method="milora", sparsity="roselora", **CFG))
    x = torch.randn(5, 20, dtype=torch.float64)
    assert_close(layer(x), lin(x).detach(), torch.float64, "milora init", tol=1e-12)
    assert layer.adapter_config.effective_sparsity == "roselora" and layer.adapter_config.effective_regularizer is None


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rose_keep"):
        lk.AdapterConfig(method="roselora", rose_keep=1.5)
    with pytest.raises(ValueError, match="rose_t_final"):
        lk.AdapterConfig(method="roselora", rose_t_init=5, rose_t_final=4)
    with pytest.raises(ValueError, match="rose_ema"):
        lk.AdapterConfig(method="roselora", rose_ema=1.0)
    with pytest.raises(ValueError, match="rose_clamp"):
        lk.AdapterConfig(method="roselora", rose_clamp=0.0)
    with pytest.raises(ValueError, match="sparsity"):
        lk.AdapterConfig(sparsity="magnitude")
