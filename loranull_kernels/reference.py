"""Plain PyTorch reference of every op, written for clarity, not speed.

Tests compare each backend against these functions evaluated on float64 copies of the inputs; benchmarks use them
as the "naive PyTorch" provider and to check each provider's output before timing it. They are differentiable
through ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rank_scale: torch.Tensor | None = None,
    mask_A: torch.Tensor | None = None,
    mask_B: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + scaling · (drop(x) (A⊙mask_A)ᵀ ⊙ d) (B⊙mask_B)ᵀ + bias``.

    Args:
        x: (..., in). weight: (out, in). lora_A: (r, in). lora_B: (out, r). rank_scale ``d``: (r,) or None.
        mask_A / mask_B: bool, shapes of A / B, or None.
        keep_mask: bool (..., in), the dropout keep mask to apply (scaled by 1/(1-dropout_p)); when None and
            dropout_p > 0, ``F.dropout`` draws a fresh one (the naive LoRA of most code bases).
    Returns:
        (..., out), dtype of x.
    """
    A = lora_A if mask_A is None else lora_A * mask_A
    B = lora_B if mask_B is None else lora_B * mask_B
    if keep_mask is not None:
        xd = x * keep_mask / (1.0 - dropout_p)
    elif dropout_p > 0:
        xd = F.dropout(x, dropout_p, training=True)
    else:
        xd = x
    h = F.linear(xd, A)
    if rank_scale is not None:
        h = h * rank_scale
    return F.linear(x, weight, bias) + scaling * F.linear(h, B)
