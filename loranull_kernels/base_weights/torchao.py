"""An ``nn.Linear`` whose weight is a self-dequantizing tensor subclass (torchao's quantized tensors)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora_linear.quantized_weight import QuantizedWeight
from .base import BaseWeight


class TorchaoLinear(BaseWeight):
    """``nn.Linear`` with a tensor-subclass weight that has ``dequantize()`` (torchao's ``quantize_`` with
    ``Int8WeightOnlyConfig``, ``IntxWeightOnlyConfig``, ... turns linears into this). Read as a ``"subclass"``
    :class:`QuantizedWeight`: the fused op dequantizes it per call (PyTorch path), never keeping the dense copy.

    torchao tensors do not record the configuration that quantized them, so a residual cannot be re-quantized
    "with the layer's own settings": methods that rewrite the base (pissa, milora, kasa, lora_null with
    ``init="svd"``) are refused on it, with that reason.
    """

    quantized_format = "subclass"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        w = module.weight
        # A subclass that defines its own dequantize(): every torch.Tensor has one (identity on float tensors), so
        # merely having it would also claim bitsandbytes parameters not yet quantized, FSDP2's DTensors, ...
        return (isinstance(w, torch.Tensor) and getattr(type(w), "dequantize", None) is not torch.Tensor.dequantize
                and tuple(w.shape) == (module.out_features, module.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return input_dtype

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight("subclass", self.module.weight, (self.out_features, self.in_features))

    def dense(self) -> torch.Tensor:
        return self.module.weight.detach().dequantize().to(self.dtype)

    def requantize_refusal(self) -> str | None:
        return (f"a torchao-quantized weight ({type(self.module.weight).__name__}) does not record the configuration "
                "that quantized it, so a rewritten base cannot be re-quantized with the layer's own settings")
