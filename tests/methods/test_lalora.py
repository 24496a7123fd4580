"""LaLoRA: curvature estimation (diag Fisher, K-FAC with a sketched output factor), θ0, the penalty and its gradient
against the explicit quadratic form, λ = 0, the λ trade-off, compositions and errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

import loranull_kernels as lk
from loranull_kernels.methods import lalora
from loranull_kernels.nn import LoRALinear

from ..helpers import assert_close
from ..pieces_helpers import one_thread, regression_task, train, two_layer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def source_batches(n=3, dtype=torch.float64, seed=5):
    x, y = regression_task(n=8 * n, dtype=dtype, seed=seed)
    return list(zip(x.chunk(n), y.chunk(n)))


def adapters(model):
    return [m for m in model if isinstance(m, LoRALinear)]


def moved(model, scale=0.2):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("init", ["lora", "milora"])
def test_diag_curvature_is_the_mean_squared_batch_gradient(init):
    model = two_layer(lk.AdapterConfig(method=init, regularizer="lalora", r=3), dtype=torch.float64)
    batches = source_batches()
    reference = copy.deepcopy(model)
    assert lk.estimate_curvature(model, batches, loss_fn=mse, kind="diag") == 3
    params = [p for l in adapters(reference) for p in (l.lora_A, l.lora_B)]
    squares = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for s, g in zip(squares, torch.autograd.grad(mse(reference, batch), params)):
            s += g.square()
    for i, layer in enumerate(adapters(model)):
        FA, FB = squares[2 * i] / 3, squares[2 * i + 1] / 3
        assert_close(layer.lalora_FA, FA, torch.float32, "F_A", tol=1e-6)
        assert_close(layer.lalora_FB, FB, torch.float32, "F_B", tol=1e-6)
        assert torch.equal(layer.lalora_A0, layer.lora_A) and torch.equal(layer.lalora_B0, layer.lora_B)
        assert layer.lora_A.grad is None and layer.lora_B.grad is None, ".grad is left alone"
        if init == "lora":
            assert not layer.lalora_FA.any(), "at B0 = 0 the loss has no gradient w.r.t. A: zero curvature"
        else:
            assert layer.lalora_FA.abs().max() > 0


def test_kfac_factors_equal_their_definitions():
    cfg = lk.AdapterConfig(method="milora", regularizer="lalora", r=3, lalora_curvature="kfac")
    model = two_layer(cfg, dtype=torch.float64)
    batches = source_batches()
    reference = copy.deepcopy(model)
    lk.estimate_curvature(model, batches, loss_fn=mse, rank=16)  # rank ≥ out: the sketch is exact
    # B's inputs a = s·(A x) and output gradients g, taken with plain hooks on the reference
    for i, (layer, ref) in enumerate(zip(adapters(model), adapters(reference))):
        aa, gg, tokens = 0, 0, 0
        for batch in batches:
            seen = {}
            h = ref.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
            loss = mse(reference, batch)
            h.remove()
            (g,) = torch.autograd.grad(loss, seen["y"])
            a = ref.scaling * seen["x"].detach() @ ref.lora_A.detach().t()
            aa, gg, tokens = aa + a.t() @ a, gg + g.t() @ g, tokens + a.shape[0]
        S, G = aa / tokens, gg / len(batches)
        assert_close(layer.lalora_S, S, torch.float32, f"S of layer {i}", tol=1e-6)
        G_hat = layer.lalora_GU.double() @ torch.diag(layer.lalora_Gs.double()) @ layer.lalora_GU.double().t()
        assert_close(G_hat, G, torch.float32, f"G of layer {i}", tol=1e-5)
        assert layer.lalora_GU.shape == (layer.out_features, layer.out_features)
        assert getattr(layer, "lalora_FB", None) is None and layer.lalora_FA is not None


def test_nystrom_sketch_is_exact_on_low_rank_and_near_optimal_otherwise():
    n, k = 60, 4
    U = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    low = U[:, :k] @ torch.diag(torch.tensor([9.0, 4.0, 2.0, 1.0], dtype=torch.float64)) @ U[:, :k].t()
    # 12 oversampling columns: with 6, the eigenvalue bound below failed for 12 of 1000 random sketches; with 12,
    # for none of 1000 (a fresh random sketch every session must not make the test flaky).
    Omega = torch.linalg.qr(torch.randn(n, k + 12, dtype=torch.float64)).Q
    V, s = lalora.nystrom_eig(low @ Omega, Omega, k)
    assert_close(V @ torch.diag(s) @ V.t(), low, torch.float64, "rank-4 matrix from a rank-16 sketch", tol=1e-9)
    spectrum = 0.5 ** torch.arange(n, dtype=torch.float64)  # a decaying spectrum
    full = U @ torch.diag(spectrum) @ U.t()
    V, s = lalora.nystrom_eig(full @ Omega, Omega, k)
    assert_close(s, spectrum[:k], torch.float64, "top eigenvalues", tol=2e-2)
    assert torch.linalg.matrix_norm(full - V @ torch.diag(s) @ V.t(), 2) < 3 * spectrum[k]


def _explicit_penalty(layer, cfg, A, B):
    """(λ/2) θᵀΛθ with Λ built densely (float64): diag entries, or kron(G, S) for B's row-major flattening."""
    lam, delta = cfg.lalora_lambda, cfg.lalora_prior_precision
    dA, dB = (A - layer.lalora_A0.double()).reshape(-1), (B - layer.lalora_B0.double()).reshape(-1)
    quad = dA @ ((layer.lalora_FA.double().reshape(-1) + delta) * dA)
    if getattr(layer, "lalora_S", None) is not None:
        G = layer.lalora_GU.double() @ torch.diag(layer.lalora_Gs.double()) @ layer.lalora_GU.double().t()
        Lam_B = torch.kron(G, layer.lalora_S.double()) + delta * torch.eye(dB.numel(), dtype=torch.float64)
    else:
        Lam_B = torch.diag(layer.lalora_FB.double().reshape(-1) + delta)
    return 0.5 * lam * (quad + dB @ Lam_B @ dB)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_penalty_and_gradient_match_the_explicit_quadratic_form(kind):
    cfg = lk.AdapterConfig(method="pissa", regularizer="lalora", r=3, lalora_lambda=2.5,
                           lalora_prior_precision=0.3, lalora_curvature=kind, lalora_kfac_rank=5)
    model = two_layer(cfg, dtype=torch.float64)
    lk.estimate_curvature(model, source_batches(), loss_fn=mse)
    moved(model)
    loss = lk.regularization_loss(model)
    loss.backward()
    total = 0
    for layer in adapters(model):
        A = layer.lora_A.detach().clone().requires_grad_()
        B = layer.lora_B.detach().clone().requires_grad_()
        explicit = _explicit_penalty(layer, cfg, A, B)
        explicit.backward()
        assert_close(layer.lora_A.grad, A.grad, torch.float64, "dA", tol=1e-10)
        assert_close(layer.lora_B.grad, B.grad, torch.float64, "dB", tol=1e-10)
        total = total + explicit.detach()
        if kind == "kfac":
            assert layer.lalora_GU.shape == (layer.out_features, 5), "the output factor is truncated to rank 5"
    assert_close(loss, total, torch.float64, "penalty", tol=1e-10)


def test_A_is_pulled_back_by_the_prior_only_at_B0_zero():
    cfg = lk.AdapterConfig(method="lalora", r=3, lalora_lambda=4.0, lalora_prior_precision=0.5)
    model = two_layer(cfg, dtype=torch.float64)
    lk.estimate_curvature(model, source_batches(), loss_fn=mse)
    layer = model[0]
    with torch.no_grad():
        layer.lora_A.add_(0.1)  # only A moves
    expected = 0.5 * 4.0 * 0.5 * (layer.lora_A - layer.lalora_A0).square().sum()
    assert_close(lalora.penalty(layer, cfg), expected, torch.float64, "λδ/2 ‖ΔA‖²", tol=1e-12)


def test_lambda_zero_reproduces_plain_training():
    cfg = lk.AdapterConfig(method="lalora", r=3, lalora_lambda=0.0, lalora_curvature="kfac", lalora_kfac_rank=4)
    regularized = two_layer(cfg)
    plain = copy.deepcopy(regularized)
    for layer in adapters(plain):
        layer.adapter_config = lk.AdapterConfig(method="lora", r=3)
    lk.estimate_curvature(regularized, source_batches(dtype=torch.float32), loss_fn=mse)
    x, y = regression_task(seed=7)
    a = train(regularized, x, y, steps=8)
    b = train(plain, x, y, steps=8)
    assert a == b
    for p, q in zip(regularized.parameters(), plain.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_lambda_trades_learning_for_staying_close(kind):
    x, y = regression_task(seed=7)
    distances, losses = [], []
    for lam in (0.0, 10.0, 1000.0):
        cfg = lk.AdapterConfig(method="milora", regularizer="lalora", r=3, lalora_lambda=lam, lalora_curvature=kind,
                               lalora_prior_precision=1e-2, init_seed=0)
        torch.manual_seed(0)
        model = two_layer(cfg)
        lk.estimate_curvature(model, source_batches(dtype=torch.float32), loss_fn=mse)
        losses.append(train(model, x, y, steps=15, regularize=True)[-1])
        unit = copy.deepcopy(cfg)
        unit.lalora_lambda = 1.0
        distances.append(sum(lalora.penalty(l, unit).item() for l in adapters(model)))
    assert distances[0] > distances[1] > distances[2], distances
    assert losses[0] < losses[2], losses


def test_compositions_train():
    x, y = regression_task(seed=8)
    for cfg in (lk.AdapterConfig(method="lora_null", regularizer="lalora", r=3, lalora_curvature="kfac"),
                lk.AdapterConfig(method="lora_null", freeze_A=True, regularizer="lalora", r=3),
                lk.AdapterConfig(method="kasa", regularizer="lalora", r=3)):
        model = two_layer(cfg)
        lk.estimate_curvature(model, source_batches(dtype=torch.float32), loss_fn=mse)
        # 80 steps: the frozen-A composition learns slowest; its loss ratio, worst of N random inits (auto backend):
        # 15 steps 0.898 (N=60), 40: 0.83 (N=140), 60: 0.81 (N=160), 80: 0.75 (N=100, mean 0.65, sd 0.04).
        losses = train(model, x, y, steps=80)
        assert losses[-1] < 0.9 * losses[0], (cfg.method, losses)
        if cfg.freeze_A:
            assert model[0].lalora_A0 is None, "a frozen A carries no LaLoRA state"


def test_errors():
    model = two_layer(lk.AdapterConfig(method="lalora", r=3))
    with pytest.raises(RuntimeError, match="no curvature estimate.*estimate_curvature"):
        lk.regularization_loss(model)
    with pytest.raises(ValueError, match="yielded no batch"):
        lk.estimate_curvature(model, [], loss_fn=mse)
    with pytest.raises(ValueError, match="kind must be"):
        lk.estimate_curvature(model, source_batches(), loss_fn=mse, kind="full")
    with pytest.raises(ValueError, match="no adapter uses the LaLoRA regulariser"):
        lk.estimate_curvature(two_layer(lk.AdapterConfig(method="lora", r=3)), source_batches(), loss_fn=mse)
    with pytest.raises(TypeError, match="default loss_fn takes dict batches"):
        lk.estimate_curvature(model, source_batches())
    with pytest.raises(ValueError, match="lalora_curvature"):
        lk.AdapterConfig(method="lalora", lalora_curvature="full")
    with pytest.raises(ValueError, match="lalora_kfac_rank"):
        lk.AdapterConfig(method="lalora", lalora_kfac_rank=0)
    with pytest.raises(ValueError, match="lalora_lambda"):
        lk.AdapterConfig(method="lalora", lalora_lambda=float("nan"))
