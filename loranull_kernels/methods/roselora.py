"""RoseLoRA: row- and column-wise sparse adapters for knowledge editing (docs/methods.md#roselora). The method is LoRA's
initialiser plus this sparsity schedule; the schedule composes with any initialiser (``sparsity="roselora"``).

After every optimiser step t (:func:`after_step`, called by :func:`loranull_kernels.after_optimizer_step`):

- importance per entry ``I = |p ⊙ ∇p|`` from the gradient the optimiser just used (under gradient accumulation,
  the accumulated ``.grad``), EMA ``Ī ← ema·Ī + (1 − ema)·I`` (first update: ``Ī = I``), from step 0 on;
- keep fraction ``τ_t`` (:func:`keep_fraction`): 1 before ``t_i``, ``τ + (1 − τ)(1 − (t − t_i)/(t_f − t_i))³``
  until ``t_f``, then τ;
- while ``τ_t < 1``: in every row of A and every column of B the ``k = ⌊n(1 − τ_t)⌋`` entries of smallest Ī
  (:func:`n_pruned`) are masked and zeroed, so each keeps ``n − k = ⌈nτ_t⌉``; then A and B are clamped to
  ``±rose_clamp`` if set. (The reference code zeroes entries strictly below the k-th smallest, i.e. k − 1 of them:
  one more survivor per line than the budget allows.)

Unlike the reference, p is read after the optimiser step (the importance of an entry the step just moved uses its
new value). Masks are the layer's ``mask_A`` / ``mask_B`` buffers, which the fused op applies to the weights as it
loads them and to the gradients, so masked entries neither act nor learn whatever the optimiser's momentum does to
the stored values; their importance decays from then on (zero gradient). Until the first pruning step the masks
are None and the op runs unmasked. State, saved with the adapter: ``rose_imp_A`` (r, in) and ``rose_imp_B``
(out, r) float32, ``rose_updates`` (0-dim int64), registered when the layer is built (:func:`attach`, called by
``LoRALinear.attach_pieces``) so a fresh model's ``state_dict`` has the keys of a trained one; the masks, None until
the first pruning step, are adopted from a ``state_dict`` that has them.
"""
from __future__ import annotations

import math

import torch

from ..ops.rose_prune import RoseTensors, rose_prune_
from .base import Method, Option, SparsitySchedule, is_real, nonnegative_int
from .lora import initialize

def keep_fraction(step: int, config) -> float:
    """τ_t: the fraction of each row of A / column of B kept after optimiser step ``step`` (0-based)."""
    tau, t_i, t_f = config.rose_keep, config.rose_t_init, config.rose_t_final
    if step < t_i:
        return 1.0
    if step >= t_f:
        return tau
    return tau + (1.0 - tau) * (1.0 - (step - t_i) / (t_f - t_i)) ** 3


def n_pruned(n: int, tau: float) -> int:
    """``⌊n(1 − τ)⌋``: entries masked in a line of n entries at keep fraction τ. The tiny slack keeps an exact
    product (n = 40, τ = 0.25 → 30) from rounding down to one less."""
    return min(n, max(0, math.floor(n * (1.0 - tau) + 1e-9)))


def attach(layer, config=None) -> None:
    """Register the importance state on ``layer`` (zeros; idempotent): ``rose_imp_A``, ``rose_imp_B``,
    ``rose_updates``. Masks stay None until the schedule first prunes. Called at construction
    (``LoRALinear.attach_pieces``) and again, harmlessly, at every step."""
    if getattr(layer, "rose_updates", None) is not None:
        return
    dev = layer.lora_A.device
    layer.register_buffer("rose_imp_A", torch.zeros(layer.lora_A.shape, dtype=torch.float32, device=dev))
    layer.register_buffer("rose_imp_B", torch.zeros(layer.lora_B.shape, dtype=torch.float32, device=dev))
    layer.register_buffer("rose_updates", torch.zeros((), dtype=torch.int64, device=dev))


def _trained(layer, name: str, module_name: str):
    p = getattr(layer, name)
    if not p.requires_grad:
        return None
    if p.grad is None:
        raise RuntimeError(
            f"RoseLoRA: {module_name + '.' if module_name else ''}{name} has no gradient. Call "
            "lk.after_optimizer_step(model, step) after loss.backward() and optimizer.step() but before "
            "optimizer.zero_grad() (the importance is read from the accumulated .grad), and make sure the layer "
            "took part in the forward pass.")
    return p


def after_step(layer, step: int, config, module_name: str = "") -> float:
    """RoseLoRA's update of one :class:`~loranull_kernels.nn.LoRALinear` after optimiser step ``step``: importance
    EMA and, while τ_t < 1, masks, zeroing and clamp, in one fused pass
    (:func:`~loranull_kernels.ops.rose_prune.rose_prune_`).
    Returns τ_t. Frozen factors (``freeze_A``) are neither scored nor masked.

    Raises:
        RuntimeError: a trainable factor has no ``.grad`` (the message names it and says when to call).
    """
    if layer.merged:
        raise RuntimeError(f"RoseLoRA: {module_name or 'the layer'} is merged; unmerge it before training on")
    attach(layer, config)
    A, B = _trained(layer, "lora_A", module_name), _trained(layer, "lora_B", module_name)
    tau = keep_fraction(step, config)
    prune = tau < 1.0
    if A is None and B is None:
        return tau
    if prune:
        for name, p in (("mask_A", A), ("mask_B", B)):
            if p is not None and getattr(layer, name) is None:
                setattr(layer, name, torch.ones(p.shape, dtype=torch.bool, device=p.device))
    state_A, state_B = _state(A, layer.rose_imp_A, layer.mask_A), _state(B, layer.rose_imp_B, layer.mask_B)
    rose_prune_(layer.rose_updates, config.rose_ema, state_A, state_B,
                n_prune_A=n_pruned(layer.in_features, tau), n_prune_B=n_pruned(layer.out_features, tau),
                prune=prune, clamp=config.rose_clamp if prune else None)
    for p, state in ((A, state_A), (B, state_B)):
        if p is not None and _is_dtensor(p):
            _write_shard(p, state.param)
    layer.rose_updates += 1
    return tau


def _state(p, importance, mask):
    if p is None:
        return None
    if mask is None:  # before the first pruning step nothing writes the mask: a throwaway stands in
        mask = torch.empty(p.shape, dtype=torch.bool, device=p.device)
    return RoseTensors(_whole(p.data), _whole(p.grad), importance, mask)


# FSDP2 (fully_shard) keeps parameters and gradients as sharded DTensors between forward passes, while the
# per-row / per-column top-k needs whole lines: a sharded factor is all-gathered (every rank then computes the same
# masks and importance, which stay whole, replicated buffers) and its updated values written back shard by shard.
def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _whole(t):
    return t.full_tensor() if _is_dtensor(t) else t


def _write_shard(p, whole: torch.Tensor) -> None:
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():  # every rank holds the same `whole`: each keeps its own shard, no communication
        p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())


def check_config(config) -> None:
    if config.rose_t_final < config.rose_t_init:
        raise ValueError(f"AdapterConfig.rose_t_final={config.rose_t_final} must be ≥ "
                         f"rose_t_init={config.rose_t_init}")


METHOD = Method(
    "roselora", initialize,
    sparsity=SparsitySchedule("roselora", attach, after_step, state_prefix="rose_"),
    options=(Option("rose_keep", 0.05, lambda v: is_real(v) and 0.0 < v <= 1.0, "in (0, 1]"),
             nonnegative_int("rose_t_init", 3), nonnegative_int("rose_t_final", 20),
             Option("rose_ema", 0.8, lambda v: is_real(v) and 0.0 <= v < 1.0, "in [0, 1)"),
             Option("rose_clamp", None, lambda v: v is None or (is_real(v) and v > 0),
                    "a finite number > 0 or None")),
    check_config=check_config,
)
