"""Every tensor argument of every Triton-backed op, laid out non-contiguous, expanded (stride 0) and at a storage
offset, against the float64 reference: a kernel that assumes a stride reads the wrong elements (issue: the bias and
rank_scale of lora_linear were read as if contiguous). The gaps around strided data hold NaN (or the mask's
negation), so a misread cannot go unnoticed."""
import math

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import reference
from loranull_kernels.ops.lora_linear import keep_mask
from loranull_kernels.ops.rose_prune import RoseTensors, rose_prune_

from ..conftest import DEVICE
from ..helpers import assert_close, f64

LAYOUTS = ["strided", "transposed", "offset", "expanded"]


def _filler(t):
    return ~t if t.dtype == torch.bool else torch.full_like(t, math.nan)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in ``layout`` (differentiable back to ``t``). ``expanded`` broadcasts the first row (or the
    first element of a vector) over the leading dimension: the values change, callers compare against the same
    expanded tensor."""
    if layout == "strided":  # every other element of a twice-as-wide buffer
        return torch.stack([t, _filler(t)], dim=-1)[..., 0]
    if layout == "transposed":  # column-major (a vector: stride 3 in a buffer of garbage)
        if t.dim() == 1:
            return torch.stack([t, _filler(t), _filler(t)], dim=-1)[:, 0]
        return t.t().contiguous().t()
    if layout == "offset":  # the data starts 7 elements into a buffer that holds garbage on both sides
        pad = _filler(t.reshape(-1)[:1]).expand(7)
        return torch.cat([pad, t.reshape(-1), pad])[7:7 + t.numel()].view(t.shape)
    if layout == "expanded":
        return t[:1].expand(t.shape)
    raise ValueError(layout)


def _expected_strides(t: torch.Tensor, layout: str) -> None:
    if layout == "expanded":
        assert t.stride(0) == 0
    elif layout == "offset":
        assert t.storage_offset() == 7
    else:
        assert not t.is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_lora_linear_every_argument_in_layout(layout, dropout_p):
    """x, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B and the incoming gradient all in ``layout``;
    output and every gradient match the float64 reference computed from the same values."""
    M, K, N, r = 13, 37, 21, 5
    leaves = {
        "x": torch.randn(M, K, device=DEVICE),
        "lora_A": torch.randn(r, K, device=DEVICE) / math.sqrt(K),
        "lora_B": torch.randn(N, r, device=DEVICE),
        "rank_scale": torch.randn(r, device=DEVICE),
        "bias": torch.randn(N, device=DEVICE),
    }
    weight = torch.randn(N, K, device=DEVICE) / math.sqrt(K)
    masks = {"mask_A": torch.rand(r, K, device=DEVICE) > 0.3, "mask_B": torch.rand(N, r, device=DEVICE) > 0.3}
    grad_y = torch.randn(M, N, device=DEVICE)
    for t in leaves.values():
        t.requires_grad_(True)

    args = {name: lay_out(t, layout) for name, t in {**leaves, **masks}.items()}
    w, gy = lay_out(weight, layout), lay_out(grad_y, layout)
    for t in (*args.values(), w, gy):
        _expected_strides(t, layout)
    seed = 99
    with lk.backend.use("triton"):
        y = lk.lora_linear(args["x"], w, args["lora_A"], args["lora_B"], 0.8, bias=args["bias"], dropout_p=dropout_p,
                           rank_scale=args["rank_scale"], mask_A=args["mask_A"], mask_B=args["mask_B"], seed=seed)
    y.backward(gy)

    # The reference sees the same values, contiguous, in float64.
    ref = {name: f64(t.detach()).requires_grad_(True) for name, t in leaves.items()}
    ref_args = {name: lay_out(t, layout).contiguous() for name, t in ref.items()}
    km = keep_mask(seed, M, K, dropout_p, DEVICE, "triton") if dropout_p else None
    y_ref = reference.lora_linear(
        ref_args["x"], f64(w.contiguous()), ref_args["lora_A"], ref_args["lora_B"], 0.8, bias=ref_args["bias"],
        dropout_p=dropout_p, rank_scale=ref_args["rank_scale"], mask_A=args["mask_A"].contiguous(),
        mask_B=args["mask_B"].contiguous(), keep_mask=km)
    y_ref.backward(f64(gy.contiguous()))

    assert_close(y, y_ref, torch.float32, "y")
    for name, leaf in leaves.items():
        assert_close(leaf.grad, ref[name].grad, torch.float32, f"d{name}")


def test_strided_bias_and_rank_scale_match_contiguous_call():
    """The reproduction of the report: ``bias = randn(24)[::2]`` gave a different answer than its contiguous copy."""
    x, W, A, B = (torch.randn(8, 16, device=DEVICE), torch.randn(12, 16, device=DEVICE),
                  torch.randn(4, 16, device=DEVICE), torch.randn(12, 4, device=DEVICE))
    b, d = torch.randn(24, device=DEVICE)[::2], torch.randn(8, device=DEVICE)[::2]
    with lk.backend.use("triton"):
        strided = lk.lora_linear(x, W, A, B, 1.0, bias=b, rank_scale=d)
        contiguous = lk.lora_linear(x, W, A, B, 1.0, bias=b.contiguous(), rank_scale=d.contiguous())
    assert_close(strided, contiguous, torch.float32, "y", tol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_covariance_x_mask_and_C_in_layout(layout):
    T, K = 29, 35
    x = lay_out(torch.randn(T, K, device=DEVICE), layout)
    mask = lay_out(torch.rand(T, device=DEVICE) > 0.3, layout)
    C0 = torch.randn(K, K, device=DEVICE)
    C0 = C0 + C0.t()  # symmetric, as the op requires
    C = lay_out(C0, layout if layout != "expanded" else "strided")  # an expanded C cannot be written in place
    expected = reference.covariance_update(C.clone(), x, mask)
    with lk.backend.use("triton"):
        lk.covariance_update(C, x, mask)
    assert_close(C, expected, torch.float32, "C")


def test_covariance_rejects_an_expanded_C():
    C = torch.zeros(1, 8, device=DEVICE).expand(8, 8)
    with lk.backend.use("triton"), pytest.raises(ValueError, match="C"):
        lk.covariance_update(C, torch.randn(4, 8, device=DEVICE))


@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
def test_rose_prune_every_tensor_in_layout(layout):
    """param, grad, importance and mask of A and B in ``layout``: the Triton pass equals the torch fallback on
    contiguous copies (which the RoseLoRA tests check against a plain reference)."""
    r, n_in, n_out = 5, 37, 23

    def state(shape):
        p = torch.randn(*shape, device=DEVICE)
        return [p, torch.randn(*shape, device=DEVICE), torch.rand(*shape, device=DEVICE),
                torch.rand(*shape, device=DEVICE) > 0.5]

    base = {"A": state((r, n_in)), "B": state((n_out, r))}
    laid = {k: [lay_out(t, layout) for t in v] for k, v in base.items()}
    plain = {k: [t.clone() for t in v] for k, v in base.items()}
    for k in laid:
        for t in laid[k]:
            _expected_strides(t, layout)
    for name, tensors, count in (("triton", laid, torch.ones((), dtype=torch.int64)),
                                 ("torch", plain, torch.ones((), dtype=torch.int64))):
        with lk.backend.use(name):
            rose_prune_(count, 0.8, RoseTensors(*tensors["A"]), RoseTensors(*tensors["B"]), n_prune_A=20,
                        n_prune_B=9, clamp=0.9)
    for k in ("A", "B"):
        for what, got, want in zip(("param", "grad", "importance", "mask"), laid[k], plain[k]):
            assert torch.equal(got, want), f"{k}.{what}"


def test_rose_prune_rejects_an_expanded_state():
    A = RoseTensors(torch.randn(4, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE),
                    torch.zeros(1, 8, device=DEVICE).expand(4, 8), torch.ones(4, 8, dtype=torch.bool, device=DEVICE))
    with lk.backend.use("triton"), pytest.raises(ValueError, match="A.importance"):
        rose_prune_(torch.zeros((), dtype=torch.int64, device=DEVICE), 0.8, A, n_prune_A=2)
