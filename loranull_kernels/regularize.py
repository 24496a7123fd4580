"""``regularization_loss``: the loss terms of every adapter's regulariser (KaSA, LaLoRA), summed over the model."""
from __future__ import annotations

import functools

import torch
from torch import nn

from ._pieces import adapter_layers
from .methods import REGULARIZERS, kasa


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every :class:`~loranull_kernels.LoRALinear`'s regulariser penalty: add it to the task loss.

    Each layer's ``AdapterConfig.effective_regularizer`` picks its term: ``"kasa"``
    (:func:`loranull_kernels.methods.kasa.penalty`; with ``kasa_regularizer_form="reference"`` the KaSA terms are
    averaged over the KaSA layers, as the reference code does) or ``"lalora"``
    (:func:`loranull_kernels.methods.lalora.penalty`, after :func:`loranull_kernels.estimate_curvature`).

    Returns:
        A 0-dim tensor (float32; float64 for float64 adapters), differentiable w.r.t. the adapter parameters; a zero
        tensor on the model's device when no layer has a regulariser.

    Raises:
        RuntimeError: a LaLoRA layer without a curvature estimate.
    """
    summed, averaged = [], []
    device = None
    for name, layer, cfg in adapter_layers(model):
        device = layer.lora_A.device
        reg = cfg.effective_regularizer
        if reg is None:
            continue
        term = REGULARIZERS[reg].penalty(layer, cfg, name)
        (averaged if reg == "kasa" and kasa.averaged(cfg) else summed).append(term)
    terms = summed + ([torch.stack(averaged).mean()] if averaged else [])
    if not terms:
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in terms))
    return torch.stack([t.to(dtype) for t in terms]).sum()
