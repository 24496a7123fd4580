"""The adapter layers of a model with the configuration of their pieces (regulariser, sparsity schedule)."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .config import AdapterConfig
from .nn import LoRALinear


def layer_config(layer: LoRALinear) -> AdapterConfig:
    """The layer's :class:`AdapterConfig` (``from_linear`` / ``inject`` / ``load_adapter`` set it); a layer built
    with the bare constructor gets its method's defaults."""
    cfg = getattr(layer, "adapter_config", None)
    if cfg is None:
        cfg = AdapterConfig(method=layer.method, r=layer.r, alpha=layer.alpha, dropout=layer.dropout,
                            use_rslora=layer.use_rslora, freeze_A=not layer.lora_A.requires_grad)
    return cfg


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear, AdapterConfig]]:
    """``(name, layer, config)`` of every :class:`LoRALinear` in ``model`` (``model`` itself may be one)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module, layer_config(module)
