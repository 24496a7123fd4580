"""The adapter layers of a model and the configuration of each (their regulariser, sparsity schedule, ...)."""
from __future__ import annotations

import json

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


def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(name, layer)`` of every :class:`LoRALinear` in ``model``, in ``named_modules`` order (``model`` itself may
    be one: its name is then ``""``)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def configured_layers(model: nn.Module) -> list[tuple[str, LoRALinear, AdapterConfig]]:
    """``(name, layer, config)`` of every :class:`LoRALinear` in ``model`` (:func:`adapter_layers` with
    :func:`layer_config`)."""
    return [(n, m, layer_config(m)) for n, m in adapter_layers(model)]


def single_config(layers: list[tuple[str, LoRALinear]], what: str) -> AdapterConfig:
    """The one config of ``layers`` (non-empty); ``ValueError`` naming ``what`` needs it when they differ."""
    configs = {json.dumps(layer_config(l).to_dict(), sort_keys=True): n for n, l in layers}
    if len(configs) > 1:
        raise ValueError(f"the model's adapters have {len(configs)} different configs (e.g. layers "
                         f"{list(configs.values())[:2]}); {what} need one AdapterConfig")
    return layer_config(layers[0][1])
