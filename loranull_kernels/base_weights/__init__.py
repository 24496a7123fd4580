"""The base-weight seam: which modules an adapter can be put on, and how the package reads their weight.

``LoRALinear`` and everything that looks at a model before (target discovery, shape checks, calibration's memory
estimate, the base fingerprint of adapter files, the initialisers that read W) go through :func:`base_weight`, which
wraps a module in the first matching :class:`BaseWeight` kind of :data:`KINDS`:

- ``Bnb4bitLinear`` (``bnb_4bit.py``): bitsandbytes ``Linear4bit``, NF4 / FP4, kept 4-bit;
- ``Bnb8bitLinear`` (``bnb_8bit.py``): bitsandbytes ``Linear8bitLt`` with int8 weights, kept 8-bit;
- ``TorchaoLinear`` (``torchao.py``): an ``nn.Linear`` with a torchao tensor-subclass weight, kept quantized;
- ``DenseLinear``, ``DenseConv1D`` (``dense.py``): ``nn.Linear`` and GPT-2's transposed ``Conv1D``.

The quantized kinds come first: their modules are ``nn.Linear`` subclasses too. A new kind of base (a GPTQ layer, a
tensor-parallel shard) is one new module here with a :class:`BaseWeight` subclass, and its entry in :data:`KINDS`
(docs/design.md#base-weights).
"""
from __future__ import annotations

from torch import nn

from .base import BaseWeight
from .bnb_4bit import Bnb4bitLinear
from .bnb_8bit import Bnb8bitLinear
from .dense import DenseConv1D, DenseLinear, conv1d_class
from .torchao import TorchaoLinear

#: The kinds of base :func:`base_weight` recognises, tried in order.
KINDS: tuple[type[BaseWeight], ...] = (Bnb4bitLinear, Bnb8bitLinear, TorchaoLinear, DenseLinear, DenseConv1D)


def base_weight(module: nn.Module) -> BaseWeight | None:
    """``module`` seen as a :class:`BaseWeight` of the first kind in :data:`KINDS` that matches, or None when it
    is not a base an adapter can be put on."""
    for kind in KINDS:
        if kind.matches(module):
            return kind(module)
    return None


def prepare(modules) -> None:
    """:meth:`BaseWeight.prepare` every base among ``modules`` (before anything runs their forward)."""
    for module in modules:
        base = base_weight(module)
        if base is not None:
            base.prepare()


__all__ = ["BaseWeight", "KINDS", "base_weight", "prepare", "conv1d_class", "Bnb4bitLinear", "Bnb8bitLinear",
           "TorchaoLinear", "DenseLinear", "DenseConv1D"]
