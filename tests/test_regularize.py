"""The model-level API of the method pieces: ``regularization_loss``, ``after_optimizer_step``, ``estimate_curvature``
on a tiny Llama built from a config, every method and the compositions training, and the pieces' state in adapter
files."""
import copy

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.methods import kasa, lalora
from loranull_kernels.nn import LoRALinear

from .helpers import assert_close
from .pieces_helpers import one_thread, regression_task, train, two_layer  # noqa: F401
from .tiny_models import output, tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):  # the Triton interpreter would make model-level tests slow
        yield


def with_labels(batches):
    return [{**b, "labels": b["input_ids"]} for b in batches]


def adapted(config, seed=0):
    model = tiny_model("llama", torch.float32, seed=seed)
    calib = token_batches(2, seed=1) if config.needs_calibration else None
    return lk.inject(model, config, calibration_data=calib, progress=False)


CONFIGS = {
    "lora": dict(method="lora"),
    "kasa": dict(method="kasa"),
    "kasa_reference_form": dict(method="kasa", kasa_regularizer_form="reference", kasa_truncation="in"),
    "roselora": dict(method="roselora", rose_t_init=1, rose_t_final=5, rose_keep=0.3),
    "lalora_diag": dict(method="lalora", lalora_prior_precision=1e-2),
    "lalora_kfac": dict(method="lalora", lalora_curvature="kfac", lalora_kfac_rank=8),
    "lora_null+lalora": dict(method="lora_null", regularizer="lalora", lalora_curvature="kfac"),
    "lora_null_v2+lalora": dict(method="lora_null", freeze_A=True, regularizer="lalora"),
    "milora+roselora": dict(method="milora", sparsity="roselora", rose_t_init=1, rose_t_final=5, rose_keep=0.3),
    "kasa+roselora": dict(method="kasa", sparsity="roselora", rose_t_init=1, rose_t_final=5, rose_keep=0.3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_few_steps_reduce_the_loss_for_every_method(name):
    cfg = lk.AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **CONFIGS[name])
    model = adapted(cfg)
    if cfg.effective_regularizer == "lalora":
        assert lk.estimate_curvature(model, with_labels(token_batches(2, seed=3))) == 2
    batch = with_labels(token_batches(1, seed=4))[0]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(8):
        task = model(**batch).loss
        loss = task + lk.regularization_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        taus = lk.after_optimizer_step(model, step)
        losses.append(task.item())
    assert losses[-1] < 0.95 * losses[0], losses
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if cfg.effective_sparsity == "roselora":
        assert len(taus) == len(layers) and set(taus.values()) == {0.3}
        assert all(l.mask_B is not None and l.mask_B.float().mean() < 0.5 for l in layers)
    else:
        assert taus == {}


def test_zero_without_regulariser():
    plain = adapted(lk.AdapterConfig(r=4, target_modules=["q_proj"]))
    for model in (plain, torch.nn.Linear(3, 2), torch.nn.ReLU()):
        zero = lk.regularization_loss(model)
        assert zero.dim() == 0 and zero.item() == 0.0 and zero.device.type == "cpu"


def test_sums_the_penalties_of_layers_with_different_pieces():
    kasa_cfg = lk.AdapterConfig(method="kasa", r=3, kasa_gamma=0.1)
    lalora_cfg = lk.AdapterConfig(method="milora", regularizer="lalora", r=3)
    model = torch.nn.Sequential(two_layer(kasa_cfg), torch.nn.Tanh(), two_layer(lalora_cfg, dims=(12, 10, 8)),
                                two_layer(lk.AdapterConfig(r=3), dims=(8, 8, 8)))
    x, y = regression_task(dims=(20, 16, 8))
    lk.estimate_curvature(model, [(x, y)], loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    assert getattr(model[0][0], "lalora_B0", None) is None, "only layers with the LaLoRA regulariser get curvature"
    train(model, x, y, steps=3)
    expected = sum(kasa.penalty(l, kasa_cfg) for l in model[0] if isinstance(l, LoRALinear))
    expected = expected + sum(lalora.penalty(l, lalora_cfg) for l in model[2] if isinstance(l, LoRALinear))
    assert_close(lk.regularization_loss(model), expected, torch.float32, "sum of pieces", tol=1e-6)
    assert expected.item() > 0


def test_after_optimizer_step_runs_the_triton_kernel_like_the_fallback():
    cfg = lk.AdapterConfig(method="roselora", r=4, rose_t_init=0, rose_t_final=2, rose_keep=0.4)
    model = two_layer(cfg)
    x, y = regression_task()
    train(model, x, y, steps=2)
    torch.nn.functional.mse_loss(model(x), y).backward()
    on_triton = copy.deepcopy(model)
    for p, q in zip(model.parameters(), on_triton.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    lk.after_optimizer_step(model, 2)
    with lk.backend.use("triton"):
        lk.after_optimizer_step(on_triton, 2)
    for a, b in zip(model.buffers(), on_triton.buffers()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), on_triton.parameters()):
        assert torch.equal(a, b)


def test_piece_state_round_trips_through_adapter_files(tmp_path):
    cfg = lk.AdapterConfig(method="roselora", regularizer="lalora", r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                           rose_t_init=0, rose_t_final=3, rose_keep=0.5, lalora_curvature="kfac", lalora_kfac_rank=6)
    model = adapted(cfg)
    lk.estimate_curvature(model, with_labels(token_batches(2, seed=3)), loss_fn=lk.curvature.sampled_label_loss)
    batch = with_labels(token_batches(1, seed=4))[0]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        (model(**batch).loss + lk.regularization_loss(model)).backward()
        opt.step()
        lk.after_optimizer_step(model, step)
    lk.save_adapter(model, tmp_path / "adapter")

    fresh = lk.load_adapter(tiny_model("llama", torch.float32), tmp_path / "adapter")
    reused = adapted(cfg, seed=0)  # already adapted, with stale state of its own
    lk.estimate_curvature(reused, with_labels(token_batches(1, seed=9)), kind="diag")
    lk.load_adapter(reused, tmp_path / "adapter")
    names = ("rose_imp_A", "rose_imp_B", "rose_updates", "mask_A", "mask_B", "lalora_A0", "lalora_B0", "lalora_FA",
             "lalora_S", "lalora_GU", "lalora_Gs")
    for loaded in (fresh, reused):
        for (n, a), (_, b) in zip(((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)),
                                  ((n, m) for n, m in loaded.named_modules() if isinstance(m, LoRALinear))):
            for field in names:
                assert torch.equal(getattr(a, field), getattr(b, field)), (n, field)
            assert getattr(b, "lalora_FB", None) is None, "the stale diag estimate is gone"
        assert_close(lk.regularization_loss(loaded), lk.regularization_loss(model), torch.float32, "penalty")
        with torch.no_grad():
            assert_close(output(loaded, batch), output(model, batch), torch.float32, "output")
