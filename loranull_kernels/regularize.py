"""The regularisers' penalties (KaSA, LaLoRA) of every adapter of a model, two ways:

- :func:`regularization_loss`: their sum as a loss term, for training loops that add it to the task loss;
- penalty hooks (:func:`enable_penalty_hooks`, on by default after :func:`loranull_kernels.inject`): the package
  adds the penalties' gradient to the adapters' ``.grad`` right before every ``optimizer.step()``, so a training
  loop that never mentions the penalty (HF ``Trainer``, TRL's ``SFTTrainer``, Accelerate) still trains with it.

Why an optimiser step pre-hook and not per-parameter gradient hooks: by the time ``step()`` runs, the gradient is
final (every micro-batch of a gradient-accumulation cycle summed, DDP's all-reduce done, GradScaler's unscale done,
an fp16 overflow skips ``step()`` and so the hook too), so adding ``∇penalty`` there counts each penalty exactly
once per optimiser step, whatever the number of micro-batches or ranks. The penalty is evaluated on the current
parameters outside the forward pass, so activation checkpointing and autocast (disabled inside the hook; the
penalties compute in float32) do not touch it. A gradient clipping that runs before ``step()`` (the Trainer's
``max_grad_norm``) clips the task gradient only; the penalty's gradient is added after it.

The two ways never add a penalty twice: a backward pass through :func:`regularization_loss` marks the parameters
it covered, and the next optimiser step that steps a marked parameter gives it no penalty gradient (and clears its
mark). The mark is per parameter, not per layer: two optimisers that split one layer's parameters each find the
mark of their own ones.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import nn

from ._dtypes import compute_dtype
from .adapter_layers import configured_layers
from .methods import REGULARIZERS

# Layer attribute: {id(parameter)} of the layer's trainable parameters whose gradient a backward pass through its
# penalty reached since an optimiser step last stepped them.
_IN_LOSS = "_loranull_penalty_in_loss"

__all__ = ["regularization_loss", "enable_penalty_hooks", "disable_penalty_hooks", "penalty_hooks_enabled",
           "add_penalty_gradients", "penalty_values"]


def _weighted_terms(model: nn.Module, views: dict | None = None) -> list[tuple[nn.Module, torch.Tensor, float, str]]:
    """``(layer, penalty, weight, regulariser name)`` of every regularised layer of ``model`` (only those in
    ``views``, a ``{layer: stand-in}`` the penalty reads instead, when given): the model's loss is
    ``Σ weight · penalty``; the weight is 1, or 1/n for the n layers of a regulariser that averages its terms
    (``Regularizer.averaged``: KaSA's ``"reference"`` form)."""
    pieces = [(name, layer, cfg, REGULARIZERS[cfg.effective_regularizer])
              for name, layer, cfg in configured_layers(model) if cfg.effective_regularizer is not None]
    n_averaged = {}  # regulariser name -> how many layers it averages over
    for _, _, cfg, reg in pieces:
        if reg.averaged(cfg):
            n_averaged[reg.name] = n_averaged.get(reg.name, 0) + 1
    out = []
    for name, layer, cfg, reg in pieces:
        if views is not None and layer not in views:
            continue
        term = reg.penalty(layer if views is None else views[layer], cfg, name)
        out.append((layer, term, 1.0 / n_averaged[reg.name] if reg.averaged(cfg) else 1.0, reg.name))
    return out


def _mark_in_loss(layer_ref: weakref.ref, grad: torch.Tensor) -> None:
    layer = layer_ref()
    if layer is not None:
        layer.__dict__[_IN_LOSS] = {id(p) for p in _trainable(layer)}


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every :class:`~loranull_kernels.LoRALinear`'s regulariser penalty: add it to the task loss.

    Each layer's ``AdapterConfig.effective_regularizer`` picks its term: ``"kasa"``
    (:func:`loranull_kernels.methods.kasa.penalty`; with ``kasa_regularizer_form="reference"`` the KaSA terms are
    averaged over the KaSA layers, as the reference code does) or ``"lalora"``
    (:func:`loranull_kernels.methods.lalora.penalty`, after :func:`loranull_kernels.estimate_curvature`).

    Not needed when the penalty hooks are on (the default after :func:`loranull_kernels.inject`): they add the same
    gradient at the optimiser step. Using both is safe: a backward pass through this loss tells the hooks to skip
    those layers at the next optimiser step. Under gradient accumulation, add it to every micro-batch's loss divided
    by the number of micro-batches (as the task loss), so it counts once per step.

    Returns:
        A 0-dim tensor (float32; float64 for float64 adapters), differentiable w.r.t. the adapter parameters; a zero
        tensor on the model's device when no layer has a regulariser.

    Raises:
        RuntimeError: a LaLoRA layer without a curvature estimate.
    """
    terms = []
    for layer, term, weight, _ in _weighted_terms(model):
        if term.requires_grad:
            term.register_hook(functools.partial(_mark_in_loss, weakref.ref(layer)))
        terms.append(term * weight if weight != 1.0 else term)
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in terms))
    return torch.stack([t.to(dtype) for t in terms]).sum()


def penalty_values(model: nn.Module) -> dict[str, float]:
    """The current penalty of each regulariser kind, summed over the model's layers as :func:`regularization_loss`
    weighs them: e.g. ``{"kasa": 0.012}``, ``{"lalora": 3.4}``; empty without regularised layers. For logging;
    computed without gradient (FSDP2-sharded factors are all-gathered: call it on every rank)."""
    out: dict[str, float] = {}
    with torch.no_grad():
        views = {layer: _FullView(layer) for _, layer, cfg in configured_layers(model)
                 if cfg.effective_regularizer is not None}
        for _, term, weight, reg in _weighted_terms(model, views):
            out[reg] = out.get(reg, 0.0) + weight * float(term)
    return out


# -------------------------------------------------------------------------------------------------- penalty hooks
_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_GLOBAL_HOOK = None


def enable_penalty_hooks(model: nn.Module) -> nn.Module:
    """Add the gradient of ``model``'s penalties to its adapters' ``.grad`` before every ``optimizer.step()``.

    :func:`loranull_kernels.inject` calls this unless ``penalty_hooks=False``. One global optimiser step pre-hook
    (``torch.optim.optimizer.register_optimizer_step_pre_hook``) serves every model; on each step of any optimiser
    it runs :func:`add_penalty_gradients` for the layers whose trainable parameters that optimiser holds (so a
    model trained by another optimiser, or a frozen one, is left alone). Idempotent; the model is held by a weak
    reference. A ``copy.deepcopy`` of the model, or a model :func:`loranull_kernels.load_adapter` built from an
    original one, is another object: call this on it. Returns ``model``.
    """
    global _GLOBAL_HOOK
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _MODELS.add(model)
    if _GLOBAL_HOOK is None:
        _GLOBAL_HOOK = register_optimizer_step_pre_hook(_before_optimizer_step)
    return model


def disable_penalty_hooks(model: nn.Module) -> nn.Module:
    """Stop adding ``model``'s penalty gradients at optimiser steps (add :func:`regularization_loss` to the loss
    instead, or train without the penalty). Returns ``model``."""
    _MODELS.discard(model)
    return model


def penalty_hooks_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable_penalty_hooks` is in force for ``model``."""
    return model in _MODELS


def _trainable(layer: nn.Module) -> list[torch.Tensor]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def add_penalty_gradients(model: nn.Module, params: set[int] | None = None, skip: set | None = None) -> int:
    """Add ``∇ Σ weight · penalty`` (the gradient of :func:`regularization_loss`) to the ``.grad`` of ``model``'s
    regularised adapters, once; what the penalty hooks run before each optimiser step.

    Parameters marked by a backward pass through :func:`regularization_loss` since they were last stepped get
    nothing (their penalty already is in the gradient) and are unmarked. Gradients are computed with autocast disabled, cast to each
    ``.grad``'s dtype, and set where ``.grad`` is None. DTensor (FSDP2) parameters get DTensor gradients with their
    own placements.

    Args:
        model: a model holding LoRALinear layers.
        params: ``{id(parameter)}`` the optimiser steps; layers with no trainable parameter in it are skipped, and
            only parameters in it receive a gradient. None: every trainable parameter.
        skip: layers to leave alone; the layers handled here are added to it (so a layer that two registered
            models share gets its gradient once).

    Returns:
        The number of layers whose penalty gradient was added.
    """
    chosen = []  # module order: under FSDP2 every rank must all-gather the same tensors in the same order
    wanted: set[int] = set()  # the parameters that get the penalty's gradient here
    for name, layer, cfg in configured_layers(model):
        # The optimiser's parameters first: an optimiser of another model never reads this one's registry entries.
        stepped = {id(p) for p in _trainable(layer) if params is None or id(p) in params}
        if not stepped or layer.merged or (skip is not None and layer in skip):
            continue
        try:
            regularizer = cfg.effective_regularizer
        except ValueError as e:  # its method was unregistered while the model still used it
            raise ValueError(f"penalty hooks: adapter {name!r} was made with method {cfg.method!r}, which is no "
                             f"longer registered ({e})") from None
        if regularizer is None:
            continue
        in_loss = layer.__dict__.get(_IN_LOSS, set())
        if in_loss:  # these are stepped now with the penalty already in their gradient: unmark them
            remaining = in_loss - stepped
            if remaining:
                layer.__dict__[_IN_LOSS] = remaining
            else:
                del layer.__dict__[_IN_LOSS]
        if stepped - in_loss:
            chosen.append(layer)
            wanted |= stepped - in_loss
    if skip is not None:
        skip.update(chosen)
    if not chosen:
        return 0
    views, targets = {}, []
    with torch.enable_grad(), _no_autocast():
        for layer in chosen:
            views[layer] = _FullView(layer)
            targets += [(p, leaf) for p, leaf in views[layer].leaves if id(p) in wanted]
        terms = _weighted_terms(model, views)
        total = torch.stack([(t * w).to(compute_dtype(t.dtype))
                             for _, t, w, _ in terms]).sum()
        grads = torch.autograd.grad(total, [leaf for _, leaf in targets], allow_unused=True)
    with torch.no_grad():
        for (p, _), g in zip(targets, grads):
            if g is None:
                continue
            g = _like(p, g)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g.to(p.grad.dtype))
    return len(chosen)


_FACTORS = ("lora_A", "lora_B", "rank_scale")  # what the penalties read of a layer's parameters


class _FullView:
    """A layer as its penalty sees it, with ``lora_A`` / ``lora_B`` / ``rank_scale`` replaced by full, detached
    leaves (the penalty's gradient is taken w.r.t. them, never through the parameters' own autograd history).
    FSDP2 shards parameters into DTensors; the penalties need whole matrices, so those are all-gathered here
    (every rank runs the same optimiser step, so the collectives match). Everything else (the ``lalora_*``
    buffers, the config) is read from the layer."""

    def __init__(self, layer: nn.Module):
        self._layer, self._sub, self.leaves = layer, {}, []
        for name in _FACTORS:
            p = getattr(layer, name, None)
            if p is None:
                continue
            full = p.full_tensor() if _is_dtensor(p) else p
            leaf = full.detach().requires_grad_(p.requires_grad)
            self._sub[name] = leaf
            if p.requires_grad:
                self.leaves.append((p, leaf))

    def __getattr__(self, name):
        sub = self.__dict__["_sub"]
        return sub[name] if name in sub else getattr(self.__dict__["_layer"], name)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _like(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g`` (a full gradient) in ``p``'s dtype and, for a DTensor ``p``, its layout: every rank holds the same
    ``g``, so each keeps its own shard without communicating."""
    g = g.to(p.dtype)
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
    return g


def _no_autocast():
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _MODELS:
        return
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    done: set = set()
    for model in list(_MODELS):
        add_penalty_gradients(model, params, done)
