"""Tensor layouts for stride tests, and the one check of ``lora_linear`` in a layout that both backends' stride
tests run: every argument (x, weight, lora_A, lora_B, rank_scale, bias, masks, the incoming gradient) laid out the
same way, output and every gradient against the float64 reference on contiguous copies of the same values. The gaps
around strided data hold NaN (or the mask's negation), so an element read from the wrong place shows."""
import math

import torch

import loranull_kernels as lk
from loranull_kernels import reference
from loranull_kernels.ops.lora_linear import keep_mask

from ..helpers import assert_close, f64, magnitudes

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


def expected_strides(t: torch.Tensor, layout: str) -> None:
    """Assert that ``t`` really is in ``layout`` (a layout that silently came out contiguous would test nothing)."""
    if layout == "expanded":
        assert t.stride(0) == 0
    elif layout == "offset":
        assert t.storage_offset() == 7
    else:
        assert not t.is_contiguous()


def check_lora_linear_in_layout(backend: str, layout: str, dropout_p: float, dtype: torch.dtype, device,
                                shape: tuple[int, int, int, int], scaling: float, seed: int) -> None:
    """``lora_linear`` on ``backend`` with every argument in ``layout`` against the float64 reference; ``shape`` is
    (M, K, N, r)."""
    M, K, N, r = shape
    leaves = {
        "x": torch.randn(M, K, dtype=dtype, device=device),
        "lora_A": torch.randn(r, K, dtype=dtype, device=device) / math.sqrt(K),
        "lora_B": torch.randn(N, r, dtype=dtype, device=device),
        "rank_scale": torch.randn(r, dtype=dtype, device=device),
        "bias": torch.randn(N, dtype=dtype, device=device),
    }
    for t in leaves.values():
        t.requires_grad_(True)
    masks = {"mask_A": torch.rand(r, K, device=device) > 0.3, "mask_B": torch.rand(N, r, device=device) > 0.3}
    weight = torch.randn(N, K, dtype=dtype, device=device) / math.sqrt(K)
    grad_y = torch.randn(M, N, dtype=dtype, device=device)

    args = {name: lay_out(t, layout) for name, t in {**leaves, **masks}.items()}
    w, gy = lay_out(weight, layout), lay_out(grad_y, layout)
    for t in (*args.values(), w, gy):
        expected_strides(t, layout)
    with lk.backend.use(backend):
        y = lk.lora_linear(args["x"], w, args["lora_A"], args["lora_B"], scaling, bias=args["bias"],
                           dropout_p=dropout_p, rank_scale=args["rank_scale"], mask_A=args["mask_A"],
                           mask_B=args["mask_B"], seed=seed)
    y.backward(gy)

    # The reference sees the same values, contiguous, in float64, with the mask the backend drew for the seed.
    ref = {name: f64(t.detach()).requires_grad_(True) for name, t in leaves.items()}
    ref_args = {name: lay_out(t, layout).contiguous() for name, t in ref.items()}
    km = keep_mask(seed, M, K, dropout_p, device, backend) if dropout_p else None
    y_ref = reference.lora_linear(
        ref_args["x"], f64(w.contiguous()), ref_args["lora_A"], ref_args["lora_B"], scaling, bias=ref_args["bias"],
        dropout_p=dropout_p, rank_scale=ref_args["rank_scale"], mask_A=args["mask_A"].contiguous(),
        mask_B=args["mask_B"].contiguous(), keep_mask=km)
    y_ref.backward(f64(gy.contiguous()))
    def on_absolute_values(m):
        a = {name: lay_out(t, layout).contiguous() for name, t in m.items()}
        return reference.lora_linear(
            a["x"], f64(w.contiguous()).abs(), a["lora_A"], a["lora_B"], scaling, bias=a["bias"],
            dropout_p=dropout_p, rank_scale=a["rank_scale"], mask_A=args["mask_A"].contiguous(),
            mask_B=args["mask_B"].contiguous(), keep_mask=km)

    y_mag, grad_mag = magnitudes(on_absolute_values, leaves, gy.contiguous())
    assert_close(y, y_ref, dtype, "y", magnitude=y_mag)
    for name, leaf in leaves.items():
        assert_close(leaf.grad, ref[name].grad, dtype, f"d{name}", magnitude=grad_mag[name])
