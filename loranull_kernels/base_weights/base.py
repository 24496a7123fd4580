"""What the package needs from the frozen layer an adapter is put on: :class:`BaseWeight`.

A kind of base (``nn.Linear``, GPT-2's ``Conv1D``, a bitsandbytes 4-bit / 8-bit layer, a torchao-quantized linear)
is one subclass in its own module of this package, registered in :data:`loranull_kernels.base_weights.KINDS`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora_linear.quantized_weight import QuantizedWeight

_FINGERPRINT_SEED = 20240601


def fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """``W v`` (out,) float64 on the CPU for a fixed pseudo-random ``v``: a cheap signature of a dense W (out, in),
    what adapter files record to refuse loading onto another base."""
    v = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(_FINGERPRINT_SEED), dtype=torch.float64)
    return (weight @ v.to(weight.device, weight.dtype)).to(torch.float64).cpu()


class BaseWeight:
    """A frozen linear map ``y = x Wᵀ + b`` held by ``module``, seen through what adapters need.

    Subclasses define :meth:`matches` and, where the defaults (``weight`` (out, in) and ``bias`` read directly)
    do not hold, the shapes, :meth:`dense`, and for quantized kinds :meth:`quantized`, :meth:`requantize` and
    :meth:`prepare`.
    """

    #: True when the module stores its weight as (in, out) (PEFT's ``fan_in_fan_out``); exports record it.
    fan_in_fan_out = False
    #: The :class:`~loranull_kernels.ops.lora_linear.quantized_weight.QuantizedWeight` format family this kind keeps
    #: its weight in ("4bit", "int8", "subclass"), or None for a dense weight.
    quantized_format: str | None = None

    def __init__(self, module: nn.Module):
        self.module = module

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """A short name of the kind, for messages and adapter files (``"DenseLinear"``, ``"Bnb4bitLinear"``, ...)."""
        return type(self).__name__

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

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the matrix the base represents (for a quantized base: the dtype it was quantized
        from, as far as the layer records it)."""
        return self.module.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype a forward with ``input_dtype`` inputs computes in (a dense base: its own dtype)."""
        return self.dtype

    def dense(self) -> torch.Tensor:
        """W as a detached (out, in) float tensor on the module's device, in :attr:`dtype` (a quantized base:
        a fresh dequantized copy)."""
        return self.module.weight.detach()

    def quantized(self) -> QuantizedWeight | None:
        """The weight as :func:`~loranull_kernels.lora_linear` takes a quantized base (views of the module's own
        tensors, no copy), or None for a dense base."""
        return None

    def requantize(self, weight: torch.Tensor) -> nn.Module:
        """A new module of this kind, with the same quantization settings and the same bias tensor, holding the
        dense (out, in) ``weight`` quantized: what base-rewriting methods and merges store. Dense kinds are never
        asked (their adapters keep the dense weight)."""
        raise NotImplementedError(f"{self.kind} keeps a dense weight")

    def requantize_refusal(self) -> str | None:
        """Why :meth:`requantize` cannot be done for this base (None when it can)."""
        return None

    def prepare(self) -> None:
        """Make the module's storage what :meth:`quantized` reads, and keep it so through the module's own
        forwards (bitsandbytes repacks 4-bit weights for CPU inference); called before calibration runs the model.
        Nothing to do for most kinds."""

    def nbytes(self) -> int:
        """Bytes of the weight as stored (quantized bases: packed data plus scales)."""
        q = self.quantized()
        if q is not None:
            return q.nbytes()
        w = self.module.weight
        return w.numel() * w.element_size()
