"""Run HF PEFT's LoRA layers through the fused op: ``patch(model)`` / ``unpatch(model)``.

``patch`` gives every ``peft.tuners.lora.Linear`` of the model (over a dense base, or a torchao-quantized one) and
every bitsandbytes LoRA layer (``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``, QLoRA) an instance ``forward``
that calls :func:`loranull_kernels.lora_linear` when the layer's current state is one the op computes like PEFT's
forward (``peft/tuners/lora/layer.py`` and ``bnb.py``), and PEFT's own forward otherwise. The check runs on every
call, because a layer can be merged, disabled or switched to several adapters after patching; each layer logs once
per reason that it was left to PEFT. A quantized base is read in place (the kinds of
:mod:`loranull_kernels.base_weights`); a base no kind knows (GPTQ, HQQ, AWQ, ...) always falls back.

Tested with peft 0.18.1, 0.20.0 and 0.22.0 (see ``PEFT_TESTED``; 0.18 is LLaMA-Factory's pin, 0.20 axolotl's; CI
runs the PEFT tests in one venv per version, ``.ci/integrations.sh``); the layer attributes read here
(``lora_A``/``lora_B``/``scaling``/``lora_dropout``/``lora_variant``/``lora_diag``/``merged``/``disable_adapters``/
``active_adapters``/``base_layer``) are PEFT's and may move in other versions, in which case layers fall back rather
than compute something else.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

import peft as _peft
from peft.tuners.lora import Linear as _PeftLinear
from peft.tuners.lora import LoraLayer as _LoraLayer
from peft.tuners.lora import variants as _variants

from .. import backend as _backend
from ..base_weights import base_weight, conv1d_class
from ..ops.lora_linear import lora_linear
from ._instance_forward import is_patched, restore, set_forward

__all__ = ["patch", "patch_required", "unpatch", "is_patched", "unsupported_reason", "PEFT_TESTED"]

PEFT_TESTED = (">=0.18", "<0.23")
logger = logging.getLogger(__name__)

_KASA = getattr(_variants, "KasaLinearVariant", None)
# Variants whose forward is vanilla LoRA's (``result + B(A(drop(x))) * scaling``): MiCA only freezes B, which the
# fused op honours through requires_grad.
_PLAIN_VARIANTS = tuple(v for v in (getattr(_variants, "MiCALinearVariant", None),) if v is not None)


def _bnb_lora_classes() -> tuple[type, ...]:
    """PEFT's bitsandbytes LoRA layers, when bitsandbytes is installed (PEFT defines them only then)."""
    try:
        from peft.tuners.lora import bnb as _peft_bnb
    except Exception:  # bitsandbytes missing or broken: no model can hold these layers
        return ()
    return tuple(c for c in (getattr(_peft_bnb, "Linear4bit", None), getattr(_peft_bnb, "Linear8bitLt", None))
                 if c is not None)


_PATCHABLE = (_PeftLinear,) + _bnb_lora_classes()
# A dense base runs fused only when it is exactly one of these (a subclass may override forward).
_DENSE_TYPES = tuple(t for t in (nn.Linear, conv1d_class()) if t is not None)


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
    if isinstance(variant, _PLAIN_VARIANTS):
        variant = None
    elif variant is not None and not (_KASA is not None and isinstance(variant, _KASA)):
        return f"LoRA variant {type(variant).__name__}"
    if variant is not None and name in getattr(layer, "_lora_kasa_truncation_deferred", ()):
        return "KaSA base-weight truncation still deferred"
    base_module = layer.get_base_layer()
    base = base_weight(base_module)
    dense = base is not None and base.quantized_format is None
    if base is None or (dense and type(base_module) not in _DENSE_TYPES):
        return f"base layer {type(base_module).__name__} (not a kind loranull_kernels reads)"
    if base_module.weight.requires_grad:
        return "base weight is trainable"
    A, B = layer.lora_A[name], layer.lora_B[name]
    if any(getattr(w, "ds_id", None) is not None for w in (base_module.weight, A.weight, B.weight)):
        # ZeRO-3 gathers a module's own parameters when that module is called; the fused path reads the base's
        # and the adapters' weights without calling them, so it would see their (0,) shards
        return "DeepSpeed ZeRO-3-partitioned weights (PEFT's forward gathers them)"
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return "adapter matrices are not bias-free nn.Linear (lora_bias or a custom init)"
    drop = layer.lora_dropout[name]
    if not isinstance(drop, (nn.Dropout, nn.Identity)) or (isinstance(drop, nn.Dropout) and drop.inplace):
        return f"dropout module {type(drop).__name__}"
    cdt = base.compute_dtype(x.dtype)
    if x.dtype not in _backend.SUPPORTED_DTYPES or cdt not in _backend.SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} (computing in {cdt})"
    if dense and x.dtype != cdt:
        return f"input dtype {x.dtype} with base weight dtype {cdt}"
    if A.weight.dtype not in (cdt, torch.float32) or B.weight.dtype != A.weight.dtype:
        return f"adapter dtype {A.weight.dtype} beside compute dtype {cdt}"
    if not getattr(layer, "cast_input_dtype_enabled", True) and A.weight.dtype != x.dtype:
        return "input dtype casting disabled with adapters in another dtype"
    if dense and base.bias is not None and base.bias.dtype != x.dtype:
        return f"bias dtype {base.bias.dtype}"
    if x.device != base.device or A.weight.device != x.device:
        return "tensors on different devices"
    if variant is not None and layer.lora_diag[name].dtype != A.weight.dtype:
        return "KaSA diagonal dtype differs from the adapter's"
    return None


def _fused(layer: _PeftLinear, x: torch.Tensor) -> torch.Tensor:
    name = next(a for a in layer.active_adapters if a in layer.lora_A.keys())
    base = base_weight(layer.get_base_layer())
    drop = layer.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    kasa = _KASA is not None and isinstance(layer.lora_variant.get(name), _KASA)
    rank_scale = layer.lora_diag[name] if kasa else None
    A, B, scaling = layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])
    if base.quantized_format is None:
        # Conv1D stores (in, out); lora_linear wants nn.Linear's (out, in).
        weight = base.module.weight.t() if layer.fan_in_fan_out else base.module.weight
        return lora_linear(x, weight, A, B, scaling, bias=base.bias, dropout_p=p, rank_scale=rank_scale)
    # As the quantized layer's own forward: compute in its compute dtype, return the input's dtype.
    cdt = base.compute_dtype(x.dtype)
    bias = base.bias if base.bias is None or base.bias.dtype == cdt else base.bias.to(cdt)
    y = lora_linear(x.to(cdt), base.quantized(), A, B, scaling, bias=bias, dropout_p=p, rank_scale=rank_scale)
    return y.to(x.dtype)


def patch(model: nn.Module) -> nn.Module:
    """Route every PEFT LoRA linear layer in ``model`` through :func:`loranull_kernels.lora_linear`:
    ``peft.tuners.lora.Linear`` (dense or torchao base) and the bitsandbytes QLoRA layers (4-bit, 8-bit).

    Layers whose state the fused op cannot reproduce (merged, disabled, several active adapters, DoRA or another
    variant except KaSA and MiCA, a base no kind of :mod:`loranull_kernels.base_weights` reads (GPTQ, HQQ, ...), a trainable
    base, unsupported dtype, ``lora_bias``) keep PEFT's forward for that call; each such layer logs the reason once
    (logger ``loranull_kernels.integrations.peft``, INFO). Other LoRA layer classes (GPTQ, Embedding, Conv, ...)
    are left untouched, with one log line each. Idempotent. Returns ``model``. Undo with :func:`unpatch`.

    An 8-bit base computes ``x · dequantize(W)ᵀ`` in the input's dtype, as bitsandbytes' own training path does;
    its inference path also rounds the activations to int8, so eval-mode outputs differ from PEFT's by that.
    """
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, _PATCHABLE):
            base = base_weight(module.get_base_layer())
            if base is not None:
                # bitsandbytes' CPU repacking off before any forward, PEFT's own fallback forwards included (an
                # eval-mode one would repack the weight, which the fused path can only unpack with rounded scales)
                base.prepare()
            n += set_forward(module, name, unsupported_reason, _fused, logger, "PEFT")
        elif isinstance(module, _LoraLayer) and not isinstance(module, _PATCHABLE):
            # GPTQ, HQQ, Embedding, Conv, ...: other classes, never routed through the op
            logger.info("loranull_kernels: PEFT layer %s runs PEFT's own forward: %s is not a LoRA linear layer "
                        "loranull_kernels reads", name, type(module).__name__)
    logger.info("loranull_kernels: patched %d PEFT LoRA linear layer(s) (peft %s)", n, _peft.__version__)
    return model


def patch_required(model: nn.Module, who: str, remedy: str) -> int:
    """:func:`patch` for a tool that was asked to run the fused op (a Trainer callback, a plugin): returns the number
    of layers patched, and raises ``ValueError`` ("``who``: ... ``remedy``") when the model holds none, since the
    fused op would then never run and the user who asked for it should hear so."""
    patch(model)
    n = sum(is_patched(m) for m in model.modules())
    if n == 0:
        raise ValueError(f"{who}: the model has no PEFT LoRA linear layer to run on the fused op: {remedy}")
    logger.info("loranull_kernels: %s: %d PEFT LoRA layer(s) run the fused op", who, n)
    return n


def unpatch(model: nn.Module) -> nn.Module:
    """Restore PEFT's own forward on every layer :func:`patch` changed. Returns ``model``."""
    return restore(model)
