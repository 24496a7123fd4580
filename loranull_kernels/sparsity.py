"""``after_optimizer_step``: the sparsity schedules (RoseLoRA) of every adapter, run after each optimiser step."""
from __future__ import annotations

from torch import nn

from .adapter_layers import configured_layers
from .methods import SPARSITY


def after_optimizer_step(model: nn.Module, step: int) -> dict[str, float]:
    """Run every :class:`~loranull_kernels.LoRALinear`'s sparsity schedule after optimiser step ``step``.

    Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()``: RoseLoRA
    (:mod:`loranull_kernels.methods.roselora`) reads the gradient the optimiser used (the accumulated ``.grad``
    under gradient accumulation) to update its importance EMA, then, while the keep fraction τ_t < 1, rewrites the
    masks (``mask_A`` / ``mask_B``, applied by the fused op), zeroes the pruned entries and clamps. One fused pass
    per layer (a Triton kernel on GPU, the torch fallback elsewhere). Layers without a schedule are skipped.

    Args:
        model: a model holding LoRALinear layers (or one LoRALinear).
        step: the 0-based index of the optimiser step just taken (the schedule's t).

    Returns:
        ``{module name: τ_t}`` for the layers with a schedule.

    Raises:
        RuntimeError: a trainable factor of a scheduled layer has no gradient (the message names it).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int ≥ 0 (the 0-based optimiser step), got {step!r}")
    taus = {}
    for name, layer, cfg in configured_layers(model):
        piece = cfg.effective_sparsity
        if piece is not None:
            taus[name] = SPARSITY[piece].after_step(layer, step, cfg, name)
    return taus
