"""Run HF PEFT's LoRA layers through the fused op: ``patch(model)`` / ``unpatch(model)``.

``patch`` gives every ``peft.tuners.lora.Linear`` of the model an instance ``forward`` that calls
:func:`loranull_kernels.lora_linear` when the layer's current state is one the op computes exactly like PEFT's
forward (``peft/tuners/lora/layer.py``, ``Linear.forward``), and PEFT's own forward otherwise. The check runs on
every call, because a layer can be merged, disabled or switched to several adapters after patching; each layer
logs once per reason that it was left to PEFT.

Tested with peft 0.21.2 (see ``PEFT_TESTED``); the layer attributes read here (``lora_A``/``lora_B``/``scaling``/
``lora_dropout``/``lora_variant``/``lora_diag``/``merged``/``disable_adapters``/``active_adapters``/``base_layer``)
are PEFT's and may move in other versions, in which case layers fall back rather than compute something else.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

import peft as _peft
from peft.tuners.lora import Linear as _PeftLinear
from peft.tuners.lora import LoraLayer as _LoraLayer
from peft.tuners.lora import variants as _variants

from .. import backend as _backend
from ..base_weight import conv1d_class
from ..ops.lora_linear import lora_linear

__all__ = ["patch", "unpatch", "is_patched", "unsupported_reason", "PEFT_TESTED"]

PEFT_TESTED = (">=0.21.2", "<0.22")
logger = logging.getLogger(__name__)

_FLAG = "_loranull_patched"
_LOGGED = "_loranull_logged_reasons"
_KASA = getattr(_variants, "KasaLinearVariant", None)


_CONV1D = conv1d_class()


def unsupported_reason(layer: _PeftLinear, x: torch.Tensor, args=(), kwargs=None) -> str | None:
    """Why this forward call of a PEFT LoRA ``Linear`` cannot go through the fused op, or None if it can."""
    if args or kwargs:
        return "extra forward arguments (adapter_names / variant kwargs)"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged"
    active = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused op runs exactly one)"
    name = active[0]
    variant = layer.lora_variant.get(name)
    if variant is not None and not (_KASA is not None and isinstance(variant, _KASA)):
        return f"LoRA variant {type(variant).__name__}"
    if variant is not None and name in getattr(layer, "_lora_kasa_truncation_deferred", ()):
        return "KaSA base-weight truncation still deferred"
    base = layer.get_base_layer()
    if type(base) is not nn.Linear and not (_CONV1D is not None and type(base) is _CONV1D):
        return f"base layer {type(base).__name__} (quantized or custom)"
    if base.weight.requires_grad:
        return "base weight is trainable"
    A, B = layer.lora_A[name], layer.lora_B[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return "adapter matrices are not bias-free nn.Linear (lora_bias or a custom init)"
    drop = layer.lora_dropout[name]
    if not isinstance(drop, (nn.Dropout, nn.Identity)) or (isinstance(drop, nn.Dropout) and drop.inplace):
        return f"dropout module {type(drop).__name__}"
    if x.dtype not in _backend.SUPPORTED_DTYPES or x.dtype != base.weight.dtype:
        return f"input dtype {x.dtype} with base weight dtype {base.weight.dtype}"
    if A.weight.dtype not in (x.dtype, torch.float32) or B.weight.dtype != A.weight.dtype:
        return f"adapter dtype {A.weight.dtype} beside input dtype {x.dtype}"
    if not getattr(layer, "cast_input_dtype_enabled", True) and A.weight.dtype != x.dtype:
        return "input dtype casting disabled with adapters in another dtype"
    if base.bias is not None and base.bias.dtype != x.dtype:
        return f"bias dtype {base.bias.dtype}"
    if x.device != base.weight.device or A.weight.device != x.device:
        return "tensors on different devices"
    if variant is not None and layer.lora_diag[name].dtype != A.weight.dtype:
        return "KaSA diagonal dtype differs from the adapter's"
    return None


def _fused(layer: _PeftLinear, x: torch.Tensor) -> torch.Tensor:
    name = next(a for a in layer.active_adapters if a in layer.lora_A.keys())
    base = layer.get_base_layer()
    # Conv1D stores (in, out); lora_linear wants nn.Linear's (out, in).
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    drop = layer.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    rank_scale = layer.lora_diag[name] if name in layer.lora_variant else None
    return lora_linear(x, weight, layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]),
                       bias=base.bias, dropout_p=p, rank_scale=rank_scale)


def _log_once(layer: _PeftLinear, reason: str) -> None:
    seen = layer.__dict__.setdefault(_LOGGED, set())
    if reason not in seen:
        seen.add(reason)
        logger.info("loranull_kernels: PEFT layer %s runs PEFT's own forward: %s",
                    getattr(layer, "_loranull_name", "?"), reason)


def _forward(self: _PeftLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    reason = unsupported_reason(self, x, args, kwargs)
    if reason is None:
        return _fused(self, x)
    _log_once(self, reason)
    return type(self).forward(self, x, *args, **kwargs)


def patch(model: nn.Module) -> nn.Module:
    """Route every ``peft.tuners.lora.Linear`` in ``model`` through :func:`loranull_kernels.lora_linear`.

    Layers whose state the fused op cannot reproduce (merged, disabled, several active adapters, DoRA or another
    variant except KaSA, quantized or custom base layer, unsupported dtype, ``lora_bias``) keep PEFT's forward
    for that call; each such layer logs the reason once (logger ``loranull_kernels.integrations.peft``, INFO).
    Idempotent. Returns ``model``. Undo with :func:`unpatch`.
    """
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, _PeftLinear) and not module.__dict__.get(_FLAG, False):
            module._loranull_name = name
            module.forward = types.MethodType(_forward, module)
            module.__dict__[_FLAG] = True
            n += 1
        elif isinstance(module, _LoraLayer) and not isinstance(module, _PeftLinear):
            # quantized (bnb, GPTQ, ...), Embedding, Conv: other classes, never routed through the op
            logger.info("loranull_kernels: PEFT layer %s runs PEFT's own forward: %s is not a lora.Linear",
                        name, type(module).__name__)
    logger.info("loranull_kernels: patched %d PEFT LoRA Linear layer(s) (peft %s)", n, _peft.__version__)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore PEFT's own forward on every layer :func:`patch` changed. Returns ``model``."""
    for module in model.modules():
        if module.__dict__.pop(_FLAG, False):
            del module.forward
            module.__dict__.pop(_LOGGED, None)
            del module._loranull_name
    return model


def is_patched(module: nn.Module) -> bool:
    """Whether :func:`patch` replaced this layer's forward."""
    return bool(module.__dict__.get(_FLAG, False))
