"""The dense kinds of base: ``nn.Linear`` and Hugging Face's GPT-2 ``Conv1D``."""
from __future__ import annotations

import torch
from torch import nn

from .base import BaseWeight


class DenseLinear(BaseWeight):
    """``nn.Linear`` (and subclasses) with a plain floating-point weight. Quantized ``nn.Linear`` subclasses
    (bitsandbytes, torchao) are claimed by their own kinds, which come first in ``KINDS``; an ``nn.Linear`` whose
    weight is an integer tensor of an unknown quantizer is no dense base."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.weight.dtype.is_floating_point


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
