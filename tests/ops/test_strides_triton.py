"""Every tensor argument of every Triton-backed op, laid out non-contiguous, expanded (stride 0) and at a storage
offset, against the float64 reference: a kernel that assumes a stride reads the wrong elements (issue: the bias and
rank_scale of lora_linear were read as if contiguous). The gaps around strided data hold NaN (or the mask's
negation), so a misread cannot go unnoticed."""
import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import reference
from loranull_kernels.ops.rose_prune import RoseTensors, rose_prune_

from ..conftest import DEVICE
from ..helpers import assert_close
from .layouts import LAYOUTS, check_lora_linear_in_layout, expected_strides, lay_out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_lora_linear_every_argument_in_layout(layout, dropout_p):
    """x, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B and the incoming gradient all in ``layout``;
    output and every gradient match the float64 reference computed from the same values."""
    check_lora_linear_in_layout("triton", layout, dropout_p, torch.float32, DEVICE, (13, 37, 21, 5), 0.8, seed=99)


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
            expected_strides(t, layout)
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
