"""lora_linear: forward and every gradient of both backends against the float64 reference."""
import contextlib
import math

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import reference
from loranull_kernels.ops.lora_linear import keep_mask

from ..conftest import DEVICE
from ..helpers import assert_close, f64, magnitudes

BACKENDS = ["torch", "triton"]
CPU_DTYPES = [torch.float32, torch.float16]
# (leading dims of x, in, out, r): odd sizes, not multiples of any block; r = 17 pads to 32.
SHAPES = [((2, 19), 45, 29, 5), ((37,), 70, 33, 17)]
FEATURES = {
    "plain": {},
    "bias": {"bias": True},
    "dropout": {"dropout_p": 0.3},
    "rank_scale": {"rank_scale": True},
    "masks": {"mask_A": True, "mask_B": True},
    "frozen_A": {"train_A": False},
    "all": {"bias": True, "dropout_p": 0.2, "rank_scale": True, "mask_A": True, "mask_B": True},
}


def make_inputs(lead, K, N, r, dtype, features, adapter_dtype=None, device=DEVICE):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, K, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
    A = (torch.randn(r, K, device=device) / math.sqrt(K)).to(adapter_dtype).requires_grad_(True)
    B = torch.randn(N, r, device=device).to(adapter_dtype).requires_grad_(True)
    kw = dict(scaling=1.7, dropout_p=features.get("dropout_p", 0.0), train_A=features.get("train_A", True))
    if features.get("bias"):
        kw["bias"] = torch.randn(N, device=device).to(dtype).requires_grad_(True)
    if features.get("rank_scale"):
        kw["rank_scale"] = torch.randn(r, device=device).to(adapter_dtype).requires_grad_(True)
    if features.get("mask_A"):
        kw["mask_A"] = torch.rand(r, K, device=device) > 0.4
    if features.get("mask_B"):
        kw["mask_B"] = torch.rand(N, r, device=device) > 0.4
    return x, weight, A, B, kw


def run_and_compare(backend, x, weight, A, B, kw, dtype, seed=1234, ref_weight=None, guard=None):
    """Run lora_linear on `backend`, then the float64 reference with the same dropout mask; compare all.

    ``ref_weight``: the float64 (out, in) weight of the reference (default: ``weight`` itself; a quantized base
    passes its dequantization); ``guard``: a context manager the op's forward and backward run in."""
    with guard or contextlib.nullcontext(), lk.backend.use(backend):
        y = lk.lora_linear(x, weight, A, B, seed=seed, **kw)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
    W64 = f64(weight) if ref_weight is None else ref_weight

    leaves = {"x": x, "lora_A": A, "lora_B": B, "rank_scale": kw.get("rank_scale"), "bias": kw.get("bias")}
    ref_leaves = {k: f64(v) for k, v in leaves.items()}
    if not kw["train_A"]:
        ref_leaves["lora_A"].requires_grad_(False)
    p = kw["dropout_p"]
    km = None
    if p > 0:
        M, K = x.reshape(-1, x.shape[-1]).shape
        km = keep_mask(seed, M, K, p, x.device, backend).view(x.shape)
    y_ref = reference.lora_linear(
        ref_leaves["x"], W64, ref_leaves["lora_A"], ref_leaves["lora_B"], kw["scaling"],
        bias=ref_leaves["bias"], dropout_p=p, rank_scale=ref_leaves["rank_scale"],
        mask_A=kw.get("mask_A"), mask_B=kw.get("mask_B"), keep_mask=km,
    )
    y_ref.backward(f64(grad_y))
    y_mag, grad_mag = magnitudes(lambda m: reference.lora_linear(
        m["x"], W64.abs(), m["lora_A"], m["lora_B"], abs(kw["scaling"]), bias=m["bias"], dropout_p=p,
        rank_scale=m["rank_scale"], mask_A=kw.get("mask_A"), mask_B=kw.get("mask_B"), keep_mask=km,
    ), leaves, grad_y)

    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (weight.shape[0],)
    assert_close(y, y_ref, dtype, "y", magnitude=y_mag)
    for name, leaf in leaves.items():
        if leaf is None:
            continue
        if name == "lora_A" and not kw["train_A"]:
            assert leaf.grad is None, "train_A=False must not produce a gradient for lora_A"
            continue
        assert leaf.grad is not None, f"no gradient for {name}"
        assert leaf.grad.dtype == leaf.dtype, f"{name}.grad dtype {leaf.grad.dtype} != {leaf.dtype}"
        assert_close(leaf.grad, ref_leaves[name].grad, dtype, f"d{name}", magnitude=grad_mag[name])
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
def test_matches_reference(backend, dtype, feature, shape):
    lead, K, N, r = shape
    x, weight, A, B, kw = make_inputs(lead, K, N, r, dtype, FEATURES[feature])
    run_and_compare(backend, x, weight, A, B, kw, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("feature", list(FEATURES))
def test_bf16_matches_reference_gpu(feature):
    x, weight, A, B, kw = make_inputs((3, 67), 200, 150, 9, torch.bfloat16, FEATURES[feature])
    run_and_compare("triton", x, weight, A, B, kw, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapters_beside_half_base(backend):
    """PEFT keeps adapters in float32 next to a half-precision base; grads come back in the adapters' dtype."""
    x, weight, A, B, kw = make_inputs((23,), 45, 29, 6, torch.float16, FEATURES["all"], adapter_dtype=torch.float32)
    run_and_compare(backend, x, weight, A, B, kw, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend):
    base = torch.randn(45, 2 * 31, device=DEVICE)
    x = base.t()[::2].detach().requires_grad_(True)  # (31, 45), strides (2, 62): not viewable as contiguous
    assert not x.is_contiguous()
    _, weight, A, B, kw = make_inputs((31,), 45, 29, 5, torch.float32, FEATURES["all"])
    run_and_compare(backend, x, weight, A, B, kw, torch.float32)


def check_empty_batch(backend, x, weight, A, B, kw):
    """No tokens: a (0, out) output, and a backward that gives x's empty gradient and zero adapter gradients."""
    with lk.backend.use(backend):
        y = lk.lora_linear(x, weight, A, B, seed=3, **kw)
    assert y.shape == (0, B.shape[0])  # (0, out)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.all(A.grad == 0) and torch.all(B.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    check_empty_batch(backend, *make_inputs((0,), 45, 29, 5, torch.float32, FEATURES["all"]))


@pytest.mark.parametrize("feature", ["plain", "all"])
def test_gradcheck_torch_backend(feature):
    x, weight, A, B, kw = make_inputs((2, 5), 7, 6, 3, torch.float64, FEATURES[feature], device="cpu")
    extra = [kw.get("rank_scale"), kw.get("bias")]

    def fn(x, A, B, d, b):
        return lk.lora_linear(x, weight, A, B, kw["scaling"], bias=b, dropout_p=kw["dropout_p"], rank_scale=d,
                              mask_A=kw.get("mask_A"), mask_B=kw.get("mask_B"), seed=77)

    with lk.backend.use("torch"):
        assert torch.autograd.gradcheck(fn, (x, A, B, *extra), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_seed_is_bit_identical(backend):
    x, weight, A, B, kw = make_inputs((41,), 45, 29, 5, torch.float32, FEATURES["dropout"])
    outs = []
    for seed in (11, 11, 12):
        with lk.backend.use(backend):
            y = lk.lora_linear(x, weight, A, B, seed=seed, **kw)
        x.grad = A.grad = B.grad = None
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()))
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b), "same seed must give a bit-identical result"
    assert not torch.equal(outs[0][0], outs[2][0]), "another seed must give another mask"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_keeps_one_minus_p(backend, p):
    n_rows, n_cols = 96, 250
    n = n_rows * n_cols
    for seed in (0, 987654321):
        kept = keep_mask(seed, n_rows, n_cols, p, DEVICE, backend).sum().item()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) < 5 * sigma, f"kept {kept} of {n} with p={p}"
    # Independence across rows/columns: each row's and each column's keep rate is on target too.
    km = keep_mask(5, n_rows, n_cols, p, DEVICE, backend).double()
    for axis, count in ((1, n_cols), (0, n_rows)):
        rates = km.mean(axis)
        assert abs(rates.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        assert rates.std().item() < 2 * math.sqrt(p * (1 - p) / count) + 1e-9


def test_seed_none_draws_from_torch_generator():
    x, weight, A, B, kw = make_inputs((17,), 45, 29, 5, torch.float32, FEATURES["dropout"])
    torch.manual_seed(5)
    y1 = lk.lora_linear(x, weight, A, B, **kw)
    torch.manual_seed(5)
    y2 = lk.lora_linear(x, weight, A, B, **kw)
    y3 = lk.lora_linear(x, weight, A, B, **kw)
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_A_saves_no_x_and_computes_no_dA(backend, monkeypatch):
    x, weight, A, B, kw = make_inputs((40,), 45, 29, 5, torch.float32, FEATURES["frozen_A"])
    kw["dropout_p"] = 0.1
    if backend == "triton":
        from loranull_kernels.ops.lora_linear.triton_backend import _triton

        kernels = _triton()[2]

        def forbidden(*a, **k):
            raise AssertionError("dA kernel launched with train_A=False")

        monkeypatch.setattr(kernels, "lora_da_kernel", type("K", (), {"__getitem__": lambda s, g: forbidden})())
    else:
        from loranull_kernels.ops.lora_linear import sparse_dropout

        monkeypatch.setattr(sparse_dropout, "cols_product", lambda *a, **k: pytest.fail("dA computed"))
    with lk.backend.use(backend):
        y, shapes = _saved_shapes(lambda: lk.lora_linear(x, weight, A, B, seed=1, **kw))
    assert (40, 45) not in shapes, f"x was saved for backward: {shapes}"
    y.sum().backward()
    assert A.grad is None and B.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_entries_get_no_gradient(backend):
    x, weight, A, B, kw = make_inputs((30,), 45, 29, 6, torch.float32, FEATURES["masks"])
    with lk.backend.use(backend):
        lk.lora_linear(x, weight, A, B, seed=0, **kw).square().sum().backward()
    assert torch.all(A.grad[~kw["mask_A"]] == 0) and torch.all(B.grad[~kw["mask_B"]] == 0)
    assert A.grad[kw["mask_A"]].abs().sum() > 0 and B.grad[kw["mask_B"]].abs().sum() > 0


def test_triton_deterministic_mode_matches():
    """With torch's deterministic algorithms on, dB/dbias reduce through per-program slabs instead of atomics."""
    feats = {"bias": True, "rank_scale": True, "mask_B": True}
    x, weight, A, B, kw = make_inputs((70,), 45, 29, 5, torch.float32, feats)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        run_and_compare("triton", x, weight, A, B, kw, torch.float32)
    finally:
        torch.use_deterministic_algorithms(False)


def test_backends_agree_without_dropout():
    x, weight, A, B, kw = make_inputs((3, 11), 45, 29, 5, torch.float32, {"bias": True, "rank_scale": True, "mask_A": True})
    ys = []
    for backend in BACKENDS:
        with lk.backend.use(backend):
            ys.append(lk.lora_linear(x, weight, A, B, **kw))
    assert_close(ys[0], ys[1], torch.float32)
