"""bitsandbytes ``Linear8bitLt`` (LLM.int8, ``load_in_8bit``) with its weight quantized, kept 8-bit."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora_linear.quantized_weight import QuantizedWeight
from . import _bnb
from .base import BaseWeight


class Bnb8bitLinear(BaseWeight):
    """A ``bitsandbytes.nn.Linear8bitLt`` whose weight is int8 (``has_fp16_weights=False``): row-wise int8 codes
    ``CB`` (the weight's data) and row scales ``SCB`` (on the weight until the layer's first forward, on
    ``module.state`` after). Read in place as an ``"int8"`` :class:`QuantizedWeight`: ``W = CB · SCB / 127``.

    The fused op multiplies the input by that dequantized weight in the input's dtype, as bitsandbytes' own
    training path on CPU does; bitsandbytes' int8 inference path also quantizes the activations (with outlier
    columns apart), which the fused op does not: outputs differ from the layer's own by that activation rounding.
    The layer does not record the dtype it was quantized from; :attr:`dtype` is its bias's dtype, or float32.
    """

    quantized_format = "int8"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        bnb = _bnb.module()
        return (bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)
                and module.weight.dtype == torch.int8)

    def _scales(self) -> torch.Tensor:
        scb = getattr(self.module.weight, "SCB", None)
        return scb if scb is not None else self.module.state.SCB

    @property
    def dtype(self) -> torch.dtype:
        return self.module.bias.dtype if self.module.bias is not None else torch.float32

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return input_dtype  # as Linear8bitLt.forward: the input's dtype

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight("int8", self.module.weight.data, (self.out_features, self.in_features),
                               absmax=self._scales().float())

    def dense(self) -> torch.Tensor:
        return self.quantized().dequantize(self.dtype)

    def requantize(self, weight: torch.Tensor) -> nn.Module:
        import bitsandbytes as bnb

        old = self.module
        CB, SCB, _ = bnb.functional.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
        new = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=False, has_fp16_weights=False,
                                  threshold=old.state.threshold, device="meta")
        new.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
        new.bias = old.bias
        new.train(old.training)
        return new
