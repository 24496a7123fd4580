"""Penalty hooks (lk.regularize): the regularisers' gradients added at the optimiser step give the update that
``loss + lk.regularization_loss(model)`` gives, once per step (both ways at once, gradient accumulation), and are
untouched by autocast and activation checkpointing. Multi-process (DDP, FSDP2): tests/integrations/test_fsdp2.py."""
import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.regularize import add_penalty_gradients, disable_penalty_hooks, penalty_hooks_enabled
from tests.helpers import assert_close
from tests.pieces_helpers import one_thread  # noqa: F401
from tests.tiny_models import tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "kasa": dict(method="kasa", kasa_gamma=0.5, kasa_beta=0.05),
    "kasa_reference": dict(method="kasa", kasa_regularizer_form="reference", kasa_gamma=0.5),
    "lalora_kfac": dict(method="lalora", lalora_curvature="kfac", lalora_kfac_rank=6, lalora_lambda=50.0),
    "milora+lalora_diag": dict(method="milora", regularizer="lalora", lalora_lambda=50.0),
}


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def labelled(n, batch=4, seed=0):
    return [{**b, "labels": b["input_ids"]} for b in token_batches(n, batch=batch, seq=10, seed=seed)]


def adapted(name, hooks=True):
    cfg = lk.AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_seed=0, **CONFIGS[name])
    model = lk.inject(tiny_model("llama"), cfg, penalty_hooks=hooks)
    if cfg.effective_regularizer == "lalora":
        with torch.random.fork_rng(devices=[]):  # the same sketch and the same move for every copy
            torch.manual_seed(0)
            lk.estimate_curvature(model, labelled(2, seed=7))
            with torch.no_grad():  # move off θ0, or the Laplace gradient is zero at the first step
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.randn_like(p))
    return model.train()


def sgd_step(model, batch, penalty_in_loss=False, micro_batches=1, lr=0.5):
    """One SGD step on ``batch`` split into ``micro_batches`` equal parts; returns the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    opt.zero_grad()
    for ids in batch["input_ids"].chunk(micro_batches):
        loss = model(input_ids=ids, labels=ids).loss
        if penalty_in_loss:
            loss = loss + lk.regularization_loss(model)
        (loss / micro_batches).backward()
    opt.step()
    return [p.detach().clone() for p in params]


def assert_same(a, b, tol=1e-6):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert_close(x, y, torch.float32, f"parameter {i}", tol=tol)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hooks_give_the_update_of_the_loss_term(name):
    batch = labelled(1)[0]
    by_hook = sgd_step(adapted(name), batch)
    by_loss = sgd_step(adapted(name, hooks=False), batch, penalty_in_loss=True)
    without = sgd_step(adapted(name, hooks=False), batch)
    assert_same(by_hook, by_loss)
    assert max_diff(by_hook, without) > 1e-4, "the penalty must change this update, or the test shows nothing"
    # both ways at once: the backward through regularization_loss tells the hook to skip those layers
    assert_same(sgd_step(adapted(name), batch, penalty_in_loss=True), by_loss)


def split_sgd_step(model, batch, penalty_in_loss, b_first=True, lr=0.5):
    """One step of two SGD optimisers that split every layer's parameters: one holds the lora_B's, the other the
    lora_A's and rank scales (stepped first with ``b_first=False``). Returns the trainable parameters."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opts = [torch.optim.SGD([p for n, p in params if n.endswith("lora_B")], lr=lr),
            torch.optim.SGD([p for n, p in params if not n.endswith("lora_B")], lr=lr)]
    loss = model(**batch).loss
    if penalty_in_loss:
        loss = loss + lk.regularization_loss(model)
    loss.backward()
    for opt in opts if b_first else opts[::-1]:
        opt.step()
    return [p.detach().clone() for _, p in params]


@pytest.mark.parametrize("b_first", [True, False])
def test_both_ways_with_optimisers_that_split_a_layer_count_the_penalty_once(b_first):
    """The loss term's mark used to be per layer: the first optimiser's hook used it up, and the second one's
    parameters got the penalty a second time."""
    def moved(model):  # off the init, where the penalty's gradient w.r.t. B (B = 0) vanishes
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        return model

    batch = labelled(1)[0]
    by_loss = sgd_step(moved(adapted("kasa", hooks=False)), batch, penalty_in_loss=True)
    without = sgd_step(moved(adapted("kasa", hooks=False)), batch)
    b = [i for i, (n, p) in enumerate((n, p) for n, p in adapted("kasa").named_parameters() if p.requires_grad)
         if n.endswith("lora_B")]
    assert max_diff([by_loss[i] for i in b], [without[i] for i in b]) > 1e-4, "the penalty must move B too"
    assert_same(split_sgd_step(moved(adapted("kasa")), batch, penalty_in_loss=True, b_first=b_first), by_loss)
    assert_same(split_sgd_step(moved(adapted("kasa")), batch, penalty_in_loss=False, b_first=b_first), by_loss)


def test_gradient_accumulation_counts_the_penalty_once():
    batch = labelled(1, batch=4)[0]
    whole = sgd_step(adapted("kasa"), batch)
    accumulated = sgd_step(adapted("kasa"), batch, micro_batches=4)
    accumulated_in_loss = sgd_step(adapted("kasa", hooks=False), batch, penalty_in_loss=True, micro_batches=4)
    assert_same(accumulated, whole, tol=1e-5)
    assert_same(accumulated_in_loss, whole, tol=1e-5)


def test_a_penalty_computed_for_logging_does_not_suppress_the_hook():
    batch = labelled(1)[0]
    expected = sgd_step(adapted("kasa"), batch)
    model = adapted("kasa")
    logged = lk.regularization_loss(model)  # with grad, never backpropagated
    assert logged.requires_grad
    assert_same(sgd_step(model, batch), expected)


def test_opt_out_and_foreign_optimizers():
    batch = labelled(1)[0]
    without = sgd_step(adapted("kasa", hooks=False), batch)
    model = adapted("kasa")
    assert penalty_hooks_enabled(model)
    disable_penalty_hooks(model)
    assert not penalty_hooks_enabled(model)
    assert_same(sgd_step(model, batch), without)
    # an optimiser that holds none of the model's parameters leaves its gradients alone
    model = adapted("kasa")
    other = torch.nn.Linear(3, 3)
    other(torch.ones(1, 3)).sum().backward()
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    assert all(p.grad is None for p in model.parameters())


def test_autocast_does_not_touch_the_penalty_gradient():
    model = adapted("kasa")
    params = [p for p in model.parameters() if p.requires_grad]
    add_penalty_gradients(model)
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        add_penalty_gradients(model)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, e), i


def test_activation_checkpointing_gives_the_same_update():
    batch = labelled(1)[0]
    plain = sgd_step(adapted("kasa"), batch)
    model = adapted("kasa")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    assert_same(sgd_step(model, batch), plain, tol=1e-5)


def test_accelerate_gradient_accumulation_counts_the_penalty_once():
    accelerate = pytest.importorskip("accelerate")
    ids = labelled(1, batch=8)[0]["input_ids"]

    def run(accumulation, hooks=True):
        acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        model = adapted("kasa", hooks=hooks)
        params = [p for p in model.parameters() if p.requires_grad]
        model, opt = acc.prepare(model, torch.optim.SGD(params, lr=0.5))
        for chunk in ids.split(8 // accumulation):
            with acc.accumulate(model):  # the wrapped optimiser steps once, on the last micro-batch
                acc.backward(model(input_ids=chunk, labels=chunk).loss)
                opt.step()
                opt.zero_grad()
        return [p.detach().clone() for p in params]

    try:
        one = run(1)
        assert_same(run(4), one, tol=1e-5)
        assert max_diff(run(1, hooks=False), one) > 1e-4
    finally:  # Accelerate keeps process-wide singletons; leave none behind for later tests
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
