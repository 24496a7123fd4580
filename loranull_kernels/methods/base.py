"""What a method is made of (docs/methods.md): an initialiser, a trainable set, an optional regulariser, an optional
sparsity schedule. This module defines the initialiser's contract; the trainable set is ``AdapterConfig.freeze_A``
(plus ``rank_scale`` when an initialiser returns one); regularisers (``penalty(layer, config, name)``) and sparsity
schedules (``after_step(layer, step, config, name)``) are functions of their method's module, chosen per layer by
``AdapterConfig.regularizer`` / ``sparsity`` and run over a model by :func:`loranull_kernels.regularization_loss` /
:func:`loranull_kernels.after_optimizer_step`; their state lives in buffers of the layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class AdapterInit:
    """An initialiser's result, in the float32/float64 dtype it computed in (the layer casts once, at the end).

    ``weight`` is the base to store (``W_base``); it is the input W itself for methods that keep the base.
    The invariant "output unchanged at init" is ``weight + scaling · B0 diag(d0) A0 == W`` for the methods that
    promise it.

    ``base_A`` / ``base_B``: for base-rewriting methods whose removed part is not the initial adapter (KaSA drops
    W's smallest singular components and starts the adapter elsewhere), the factors with
    ``weight + scaling · base_B base_A == W``; the layer keeps them as ``lora_A0`` / ``lora_B0``. None: the initial
    adapter is that part (pissa, milora, lora_null).
    """

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    weight: torch.Tensor  # (out, in)
    rank_scale: Optional[torch.Tensor] = None  # (r,)
    base_A: Optional[torch.Tensor] = None  # (r, in)
    base_B: Optional[torch.Tensor] = None  # (out, r)


Initializer = Callable[..., AdapterInit]


@dataclass(frozen=True)
class Method:
    """A named initialiser and what it needs.

    ``initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit`` receives W as
    float32 (float64 for float64 models) and, for calibrated methods, the layer's input covariance (in, in).
    """

    name: str
    initialize: Initializer
    needs_calibration: bool = False
    rewrites_base: bool = False  # True: W_base = W − s·B0A0 ≠ W (merge/convert must know B0, A0)
    preserves_output: bool = True  # the model's output is unchanged at init


def split_singular(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float):
    """``B0 = U √(S/s)``, ``A0 = √(S/s) Vh``: the factors whose scaled product s·B0A0 is U diag(S) Vh."""
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root[None, :]
