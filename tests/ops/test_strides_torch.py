"""Every tensor argument of ``lora_linear`` on the torch backend laid out non-contiguous, transposed, at a storage
offset and expanded (stride 0), against the float64 reference on contiguous copies of the same values. The gaps
around strided data hold NaN (or the mask's negation), so an element read from the wrong place shows."""
import math

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import reference
from loranull_kernels.ops.lora_linear import keep_mask

from ..helpers import assert_close, f64

LAYOUTS = ["strided", "transposed", "offset", "expanded"]


def _filler(t):
    return ~t if t.dtype == torch.bool else torch.full_like(t, math.nan)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in ``layout``, differentiable back to ``t`` (``expanded`` repeats the first row)."""
    if layout == "strided":
        return torch.stack([t, _filler(t)], dim=-1)[..., 0]
    if layout == "transposed":
        if t.dim() == 1:
            return torch.stack([t, _filler(t), _filler(t)], dim=-1)[:, 0]
        return t.t().contiguous().t()
    if layout == "offset":
        pad = _filler(t.reshape(-1)[:1]).expand(7)
        return torch.cat([pad, t.reshape(-1), pad])[7:7 + t.numel()].view(t.shape)
    return t[:1].expand(t.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3, 0.8])  # 0.8: the dense kept-entries path
def test_torch_backend_every_argument_in_layout(layout, dropout_p, dtype):
    M, K, N, r = 11, 19, 13, 4
    leaves = {"x": torch.randn(M, K, dtype=dtype), "lora_A": torch.randn(r, K, dtype=dtype) / math.sqrt(K),
              "lora_B": torch.randn(N, r, dtype=dtype), "rank_scale": torch.randn(r, dtype=dtype),
              "bias": torch.randn(N, dtype=dtype)}
    for t in leaves.values():
        t.requires_grad_(True)
    masks = {"mask_A": torch.rand(r, K) > 0.3, "mask_B": torch.rand(N, r) > 0.3}
    weight = torch.randn(N, K, dtype=dtype) / math.sqrt(K)
    grad_y = torch.randn(M, N, dtype=dtype)
    args = {name: lay_out(t, layout) for name, t in {**leaves, **masks}.items()}
    w, gy = lay_out(weight, layout), lay_out(grad_y, layout)
    seed = 2**40 + 17  # a seed above 2**32: its high bits must be used, and the same mask regenerated in backward
    with lk.backend.use("torch"):
        y = lk.lora_linear(args["x"], w, args["lora_A"], args["lora_B"], 0.7, bias=args["bias"], dropout_p=dropout_p,
                           rank_scale=args["rank_scale"], mask_A=args["mask_A"], mask_B=args["mask_B"], seed=seed)
    y.backward(gy)

    ref = {name: f64(t.detach()).requires_grad_(True) for name, t in leaves.items()}
    ref_args = {name: lay_out(t, layout).contiguous() for name, t in ref.items()}
    km = keep_mask(seed, M, K, dropout_p, "cpu", "torch") if dropout_p else None
    y_ref = reference.lora_linear(
        ref_args["x"], f64(w.contiguous()), ref_args["lora_A"], ref_args["lora_B"], 0.7, bias=ref_args["bias"],
        dropout_p=dropout_p, rank_scale=ref_args["rank_scale"], mask_A=args["mask_A"].contiguous(),
        mask_B=args["mask_B"].contiguous(), keep_mask=km)
    y_ref.backward(f64(gy.contiguous()))
    assert_close(y, y_ref, dtype, "y")
    for name, leaf in leaves.items():
        assert_close(leaf.grad, ref[name].grad, dtype, f"d{name}")
