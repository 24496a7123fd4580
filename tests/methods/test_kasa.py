"""KaSA: the SVD-truncated base, the trainable rank_scale in the fused op, the regulariser in both forms, and PEFT's
own KaSA as the oracle."""
import copy

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.methods import kasa
from loranull_kernels.nn import LoRALinear

from ..helpers import assert_close
from ..pieces_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
peft = pytest.importorskip("peft")
from peft.tuners.lora.config import KasaConfig  # noqa: E402


class Wrap(torch.nn.Module):
    """A model around one linear, as PEFT needs a named target."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def perturbed(layer, scale=0.3):
    """Move the adapter off its init so every term of the forward and the regulariser is exercised."""
    with torch.no_grad():
        layer.lora_A.add_(scale * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(scale * torch.randn_like(layer.lora_B))
    return layer


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=["wide", "tall"])
def test_min_truncation_drops_the_r_smallest_components(shape):
    in_f, out_f = shape
    lin = torch.nn.Linear(in_f, out_f).double()
    r = 4
    layer = LoRALinear.from_linear(lin, r=r, alpha=8, method="kasa")
    S = torch.linalg.svdvals(lin.weight.detach())
    base_S = torch.linalg.svdvals(layer.weight.detach())
    k = min(in_f, out_f)
    assert_close(base_S[: k - r], S[: k - r], torch.float64, "kept spectrum", tol=1e-12)
    assert base_S[k - r:].abs().max() < 1e-12, "the r smallest components are gone"
    assert_close(layer.original_weight(), lin.weight.detach(), torch.float64, "W = base + s·B0A0", tol=1e-12)
    # the adapter starts as LoRA with a N(0, 1) rank scale: B = 0, A kaiming, d trainable
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert layer.lora_A.abs().max() <= (1.0 / in_f) ** 0.5
    assert layer.rank_scale.requires_grad and layer.rank_scale.shape == (r,)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "rank_scale"}


def test_in_truncation_follows_the_reference_and_can_truncate_nothing():
    r = 4
    wide = torch.nn.Linear(40, 12).double()  # out = 12 ≤ in − r = 36: the reference keeps every component
    layer = LoRALinear.from_linear(wide, r=r, method="kasa", kasa_truncation="in")
    assert_close(layer.weight, wide.weight.detach(), torch.float64, "untouched base", tol=1e-12)
    assert layer.lora_A0.abs().max() == 0 and layer.lora_B0.abs().max() == 0
    partial = torch.nn.Linear(14, 12).double()  # in − r = 10 < 12: drops only 2 components
    layer = LoRALinear.from_linear(partial, r=r, method="kasa", kasa_truncation="in")
    S = torch.linalg.svdvals(partial.weight.detach())
    base_S = torch.linalg.svdvals(layer.weight.detach())
    assert_close(base_S[:10], S[:10], torch.float64, "kept 10", tol=1e-12)
    assert base_S[10:].abs().max() < 1e-12
    tall = torch.nn.Linear(12, 30).double()  # in < out: in − r = min(in, out) − r, same as "min"
    a = LoRALinear.from_linear(tall, r=r, method="kasa", kasa_truncation="in")
    b = LoRALinear.from_linear(tall, r=r, method="kasa")
    assert_close(a.weight, b.weight, torch.float64, "in = min on tall layers", tol=1e-12)


def test_rank_too_large_for_truncation():
    with pytest.raises(ValueError, match="keeps no singular component"):
        LoRALinear.from_linear(torch.nn.Linear(8, 6), r=6, method="kasa")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_equals_peft_kasa(backend):
    torch.manual_seed(0)
    in_f, out_f, r, alpha, beta, gamma = 40, 24, 4, 8, 1e-2, 1e-1
    model = Wrap(torch.nn.Linear(in_f, out_f))
    cfg = lk.AdapterConfig(method="kasa", r=r, alpha=alpha, kasa_beta=beta, kasa_gamma=gamma)
    ours = LoRALinear.from_linear(model.lin, config=cfg)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["lin"], kasa_config=KasaConfig(beta=beta, gamma=gamma)))
    peft_layer = theirs.base_model.model.lin
    assert_close(peft_layer.base_layer.weight, ours.weight, torch.float32, "truncated base", tol=1e-5)

    perturbed(ours)  # equal inputs: PEFT's adapter takes ours
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
        peft_layer.lora_diag["default"].copy_(ours.rank_scale)
        peft_layer.base_layer.weight.copy_(ours.weight)
    x = torch.randn(3, 5, in_f)
    with lk.backend.use(backend):
        y = ours(x)
        y.square().sum().backward()
    y_peft = theirs(x)
    y_peft.square().sum().backward()
    assert_close(y, y_peft, torch.float32, "forward", tol=1e-5)
    assert_close(ours.rank_scale.grad, peft_layer.lora_diag["default"].grad, torch.float32, "d grad", tol=1e-4)

    for p in (ours.lora_A, ours.lora_B, ours.rank_scale, *theirs.parameters()):
        p.grad = None
    reg = lk.regularization_loss(ours)
    reg_peft = theirs.base_model._get_kasa_loss()
    assert_close(reg, reg_peft, torch.float32, "regulariser", tol=1e-6)
    reg.backward()
    reg_peft.backward()
    for name, p, q in (("A", ours.lora_A, peft_layer.lora_A["default"].weight),
                       ("B", ours.lora_B, peft_layer.lora_B["default"].weight),
                       ("d", ours.rank_scale, peft_layer.lora_diag["default"])):
        assert_close(p.grad, q.grad, torch.float32, f"regulariser grad {name}", tol=1e-5)


def _explicit(A, B, d, cfg, reference):
    """The regulariser from its definition, large Grams included (float64, small sizes)."""
    if reference:
        gA = A.t() @ A - torch.eye(A.shape[1], dtype=A.dtype)
        gB = B @ B.t() - torch.eye(B.shape[0], dtype=B.dtype)
    else:
        gA = A @ A.t() - torch.eye(A.shape[0], dtype=A.dtype)
        gB = B.t() @ B - torch.eye(B.shape[1], dtype=B.dtype)
    return cfg.kasa_beta * d.square().sum() + cfg.kasa_gamma * (torch.linalg.norm(gA) + torch.linalg.norm(gB))


@pytest.mark.parametrize("form", ["rr", "reference"])
def test_regulariser_forms_equal_their_large_matrix_definitions(form):
    cfg = lk.AdapterConfig(method="kasa", r=3, alpha=6, kasa_beta=0.3, kasa_gamma=0.7, kasa_regularizer_form=form)
    layers = torch.nn.ModuleList([perturbed(LoRALinear.from_linear(torch.nn.Linear(i, o).double(), config=cfg))
                                  for i, o in ((11, 7), (6, 13))])
    with lk.backend.use("torch"):
        loss = lk.regularization_loss(layers)
    leaves = [[l.lora_A.detach().clone().requires_grad_(), l.lora_B.detach().clone().requires_grad_(),
               l.rank_scale.detach().clone().requires_grad_()] for l in layers]
    terms = [_explicit(A, B, d, cfg, form == "reference") for A, B, d in leaves]
    expected = sum(terms) / (len(terms) if form == "reference" else 1)  # the reference averages over layers
    assert_close(loss, expected, torch.float64, "value", tol=1e-12)
    loss.backward()
    expected.backward()
    for layer, (A, B, d) in zip(layers, leaves):
        for p, q, name in ((layer.lora_A, A, "A"), (layer.lora_B, B, "B"), (layer.rank_scale, d, "d")):
            assert_close(p.grad, q.grad, torch.float64, f"grad {name}", tol=1e-12)


def test_regulariser_on_another_initialiser_has_no_rank_scale_term():
    cfg = lk.AdapterConfig(method="lora", r=3, regularizer="kasa", kasa_gamma=0.5)
    layer = perturbed(LoRALinear.from_linear(torch.nn.Linear(9, 8).double(), config=cfg))
    assert layer.rank_scale is None
    expected = _explicit(layer.lora_A.detach(), layer.lora_B.detach(), torch.zeros(0, dtype=torch.float64), cfg, False)
    assert_close(lk.regularization_loss(layer), expected, torch.float64, "γ term only", tol=1e-12)


def test_a_few_steps_reduce_the_loss_and_d_learns():
    torch.manual_seed(1)
    lin, target = torch.nn.Linear(32, 24), torch.nn.Linear(32, 24)
    layer = LoRALinear.from_linear(lin, r=4, alpha=8, method="kasa")
    d0 = layer.rank_scale.detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(64, 32)
    losses = []
    with lk.backend.use("torch"):
        for _ in range(25):
            task = torch.nn.functional.mse_loss(layer(x), target(x).detach())
            loss = task + lk.regularization_loss(layer)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(task.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert not torch.equal(layer.rank_scale.detach(), d0)


def test_save_and_load_rebuild_the_truncated_base(tmp_path):
    torch.manual_seed(2)
    model = Wrap(torch.nn.Linear(20, 12))
    original = copy.deepcopy(model)
    model.lin = perturbed(LoRALinear.from_linear(model.lin, r=3, alpha=6, method="kasa"))
    x = torch.randn(4, 20)
    with lk.backend.use("torch"):
        expected = model(x)
        lk.save_adapter(model, tmp_path / "kasa")
        lk.load_adapter(original, tmp_path / "kasa")
        got = original(x)
    assert isinstance(original.lin, LoRALinear) and original.lin.rank_scale is not None
    assert_close(original.lin.weight, model.lin.weight, torch.float32, "rebuilt base", tol=1e-6)
    assert_close(got, expected, torch.float32, "output after load", tol=1e-5)


def test_exports_to_peft_as_a_plain_lora_on_the_original_model(tmp_path):
    torch.manual_seed(3)
    model = Wrap(torch.nn.Linear(20, 12))
    original = copy.deepcopy(model)
    model.lin = perturbed(LoRALinear.from_linear(model.lin, r=3, alpha=6, method="kasa"))
    x = torch.randn(4, 20)
    with lk.backend.use("torch"):
        expected = model(x)
    lk.export_peft(model, tmp_path / "peft")
    exported = peft.PeftModel.from_pretrained(original, tmp_path / "peft").eval()
    assert_close(exported(x), expected, torch.float32, "PEFT LoRA of rank 2r on the original weight", tol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="kasa_truncation"):
        lk.AdapterConfig(method="kasa", kasa_truncation="out")
    with pytest.raises(ValueError, match="kasa_regularizer_form"):
        lk.AdapterConfig(method="kasa", kasa_regularizer_form="big")
    with pytest.raises(ValueError, match="kasa_beta"):
        lk.AdapterConfig(method="kasa", kasa_beta=-1.0)
    with pytest.raises(ValueError, match="regularizer"):
        lk.AdapterConfig(regularizer="l2")
    assert lk.AdapterConfig(method="kasa").effective_regularizer == "kasa"
    assert lk.AdapterConfig(method="kasa", regularizer=None).effective_regularizer is None
    assert kasa.kept_components(24, 16, 4, "min") == 12 and kasa.kept_components(40, 12, 4, "in") == 12
