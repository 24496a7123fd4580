"""The base-weight seam: what the package needs from the frozen layer an adapter is put on.

``LoRALinear`` holds its base as a dense ``(out, in)`` weight, and everything that looks at a model before that
(target discovery, shape checks, calibration's memory estimate, the base fingerprint of adapter files, the
initialisers that read W) goes through :func:`base_weight`, which wraps a module in the first matching
:class:`BaseWeight` kind. Two kinds exist, both dense: ``nn.Linear`` and GPT-2's ``Conv1D`` (its weight stored
transposed, ``(in, out)``).

A new kind of base (a quantised ``Linear4bit``, a GPTQ layer, a tensor-parallel shard) is one new file: a
:class:`BaseWeight` subclass with ``matches``, the shapes, ``dense()`` (the weight as a float matrix, dequantised)
and ``to_linear()``, and its name added to :data:`KINDS`. The rest of the package then finds, checks, fingerprints
and initialises adapters on it unchanged (see docs/design.md#base-weights for what remains for a non-dense
forward).
"""
from __future__ import annotations

import torch
from torch import nn


class BaseWeight:
    """A frozen linear map ``y = x Wᵀ + b`` held by ``module``, seen through what adapters need.

    Subclasses define :meth:`matches` and :meth:`dense`; the defaults read ``weight`` (out, in) and ``bias``.
    """

    #: True when the module stores its weight as (in, out) (PEFT's ``fan_in_fan_out``); exports record it.
    fan_in_fan_out = False

    def __init__(self, module: nn.Module):
        self.module = module

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        """(out,) or None, the module's own tensor (not a copy)."""
        return self.module.bias

    def dense(self) -> torch.Tensor:
        """W as a detached (out, in) float tensor on the module's device, in its dtype."""
        return self.module.weight.detach()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (the module itself when it is one; otherwise a copy holding
        :meth:`dense`), what :meth:`~loranull_kernels.LoRALinear.from_linear` wraps."""
        W = self.dense()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=W.device,
                        dtype=W.dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


class DenseLinear(BaseWeight):
    """``nn.Linear`` (and subclasses)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def to_linear(self) -> nn.Linear:
        return self.module


def conv1d_class():
    """``transformers.pytorch_utils.Conv1D``, or None when transformers is not importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: then no model can contain a Conv1D
        return None
    return Conv1D


class DenseConv1D(BaseWeight):
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed, (in, out)."""

    fan_in_fan_out = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        cls = conv1d_class()
        return cls is not None and isinstance(module, cls)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1]

    def dense(self) -> torch.Tensor:
        return self.module.weight.detach().t()


#: The kinds of base :func:`base_weight` recognises, tried in order.
KINDS: tuple[type[BaseWeight], ...] = (DenseLinear, DenseConv1D)


def base_weight(module: nn.Module) -> BaseWeight | None:
    """``module`` seen as a :class:`BaseWeight` of the first kind in :data:`KINDS` that matches, or None when it
    is not a base an adapter can be put on."""
    for kind in KINDS:
        if kind.matches(module):
            return kind(module)
    return None
