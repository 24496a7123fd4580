"""``estimate_curvature``: LaLoRA's curvature of a source-domain loss w.r.t. every adapter, and θ0.

Runs ``loss_fn(model, batch)`` over a few source batches (eval mode: no dropout; the modes are restored), takes the
per-batch gradients of the adapter factors with ``torch.autograd.grad`` (the parameters' ``.grad`` are left
untouched) and, for K-FAC, B's inputs and output gradients through hooks on the adapter layers. What is stored and
how the penalty uses it: :mod:`loranull_kernels.methods.lalora`.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_layers import configured_layers
from .methods.lalora import CurvatureAccumulator


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """``model(**batch).loss``: the empirical Fisher of a Hugging Face model whose batches carry ``labels``."""
    if not isinstance(batch, dict):
        raise TypeError(f"the default loss_fn takes dict batches (model(**batch).loss); got a {type(batch).__name__}: "
                        "pass loss_fn=lambda model, batch: ... returning a scalar loss")
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no .loss: give the batches 'labels', or pass loss_fn")
    return loss


def sampled_label_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy against labels drawn from the model's own predictive distribution at every position (for the
    Fisher rather than the empirical Fisher). ``batch``: a dict of model inputs (``labels`` ignored, an
    ``attention_mask`` selects the positions) or a tensor; the model returns logits (..., vocab) or ``.logits``."""
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        mask = batch.get("attention_mask")
    else:
        out, mask = model(batch), None
    logits = getattr(out, "logits", out)
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(flat.float(), dim=-1), 1).squeeze(-1)
    losses = F.cross_entropy(flat.float(), labels, reduction="none")
    if mask is not None:
        keep = mask.reshape(-1).to(losses.dtype)
        return (losses * keep).sum() / keep.sum().clamp_min(1)
    return losses.mean()


def _b_input(layer, x: torch.Tensor) -> torch.Tensor:
    """``a = s·d ⊙ ((A⊙mask_A) x)`` (tokens, r) float32: what B multiplies (dropout is off in eval mode)."""
    A = layer.lora_A.detach().to(torch.float32)
    if layer.mask_A is not None:
        A = A * layer.mask_A
    a = x.detach().reshape(-1, x.shape[-1]).to(torch.float32) @ A.t()
    if layer.rank_scale is not None:
        a = a * layer.rank_scale.detach().to(torch.float32)
    return layer.scaling * a


def estimate_curvature(model: nn.Module, data: Iterable, loss_fn: Optional[Callable] = None,
                       kind: Optional[str] = None, max_batches: Optional[int] = None, rank: Optional[int] = None,
                       oversample: int = 10, seed: int = 0) -> int:
    """Estimate LaLoRA's curvature on source data for every adapter whose regulariser is ``"lalora"``, and record
    θ0 (the adapter now). Call it once before fine-tuning; the buffers are saved and loaded with the adapter.

    Args:
        model: the model with its adapters (``lk.inject(..., AdapterConfig(regularizer="lalora" or
            method="lalora"))``).
        data: an iterable of source-domain batches, each passed to ``loss_fn``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default :func:`default_loss` (``model(**batch).loss``,
            the empirical Fisher). :func:`sampled_label_loss` gives the Fisher with labels sampled from the model.
        kind: ``"diag"`` (diagonal Fisher of A and B: mean squared per-batch gradients) or ``"kfac"`` (A diagonal;
            B ``E[aaᵀ] ⊗ E[ggᵀ]`` with the output factor kept at ``rank`` eigenpairs); default each layer's
            ``AdapterConfig.lalora_curvature``.
        max_batches: stop after this many batches (None: all of ``data``).
        rank: K-FAC output-factor rank; default ``AdapterConfig.lalora_kfac_rank``. The sketch has
            ``rank + oversample`` columns (exact when that reaches ``out_features``).
        seed: seed of the K-FAC sketch's random test matrix.

    Returns:
        The number of batches used.

    Raises:
        ValueError: no layer uses the LaLoRA regulariser, ``kind`` is unknown, or ``data`` is empty.
    """
    if kind not in (None, "diag", "kfac"):
        raise ValueError(f"kind must be 'diag', 'kfac' or None, got {kind!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int ≥ 1 or None, got {rank!r}")
    layers = [(n, l, c) for n, l, c in configured_layers(model) if c.effective_regularizer == "lalora"]
    if not layers:
        raise ValueError("estimate_curvature: no adapter uses the LaLoRA regulariser; build them with "
                         "AdapterConfig(method='lalora') or AdapterConfig(..., regularizer='lalora')")
    loss_fn = loss_fn or default_loss
    gen = torch.Generator().manual_seed(seed)
    accs = {}
    for name, layer, cfg in layers:
        if layer.merged:
            raise ValueError(f"estimate_curvature: {name!r} is merged; unmerge it first")
        accs[name] = CurvatureAccumulator(layer, kind or cfg.lalora_curvature, rank or cfg.lalora_kfac_rank,
                                          oversample, gen)
    params, slots = [], []  # the factors autograd differentiates, and which layer / factor each is
    for name, layer, _ in layers:
        for factor in ("lora_A", "lora_B"):
            p = getattr(layer, factor)
            if p.requires_grad:
                slots.append((name, factor))
                params.append(p)
    if not params:
        raise ValueError("estimate_curvature: the LaLoRA adapters have no trainable factor")

    def forward_hook(module, args, kwargs, output, acc):
        acc.add_inputs(_b_input(module, args[0] if args else kwargs["input"]))
        if output.requires_grad:
            output.register_hook(lambda g: acc.add_output_grads(g))

    handles = [layer.register_forward_hook(lambda m, a, kw, o, acc=accs[name]: forward_hook(m, a, kw, o, acc),
                                           with_kwargs=True)
               for name, layer, _ in layers if accs[name].kind == "kfac"]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    batches = 0
    try:
        for batch in itertools.islice(data, max_batches):
            loss = loss_fn(model, batch)
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                raise TypeError("loss_fn must return a scalar (0-dim) tensor")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            per_layer: dict[str, dict[str, torch.Tensor]] = {}
            for (name, factor), g in zip(slots, grads):
                per_layer.setdefault(name, {})[factor] = g
            for name, acc in accs.items():
                got = per_layer.get(name, {})
                acc.add_gradients(got.get("lora_A"), got.get("lora_B"))
            batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    if batches == 0:
        raise ValueError("estimate_curvature: data yielded no batch")
    for name, layer, _ in layers:
        accs[name].store(layer)
    return batches
