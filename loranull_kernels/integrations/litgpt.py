"""Run LitGPT's LoRA layers through the fused op: ``patch(model)`` / ``unpatch(model)``.

``patch`` gives every ``litgpt.lora.LoRALinear`` and ``LoRAQKVLinear`` of a model an instance ``forward`` that calls
:func:`loranull_kernels.lora_linear` when the layer's current state is one the op computes like LitGPT's forward
(``litgpt/lora.py``), and LitGPT's own forward otherwise. The check runs on every call (a layer can be merged or
its base unfrozen after patching); each layer logs once per reason it was left to LitGPT.

LitGPT's layout, which this module reads (and which is checked, so that a change falls back rather than computing
something else): ``linear`` (an ``nn.Linear``, W ``(out, in)``), ``lora_A (r·n, in)``, ``lora_B (out', r)``,
``scaling``, ``lora_dropout`` (an ``nn.Dropout``, or LitGPT's identity lambda when the rate is 0), ``merged``, ``r``.
``LoRAQKVLinear`` packs the fused q/k/v projection: W's rows are ``[q (n_head·hs), k (n_query_groups·hs),
v (n_query_groups·hs)]`` and only the enabled parts (``enable_lora``) have an adapter: enabled part j uses
``lora_A[j·r:(j+1)·r]`` and the next ``rows_j`` rows of ``lora_B``. Each part then runs the op on row slices of W,
bias, A and B (views: no weight is copied), disabled parts run a plain ``F.linear`` on their rows, and the parts'
outputs are concatenated. LitGPT applies one dropout mask to the input of all its parts; the patched forward draws
one dropout seed per call and passes it to every part, so the parts share the mask as they do in LitGPT.
"""
from __future__ import annotations

import logging
import sys
from importlib.metadata import version as _version

import torch
import torch.nn.functional as F
from torch import nn

from litgpt import lora as _lora

from .. import backend as _backend
from ..ops.lora_linear import lora_linear
from ._instance_forward import is_patched, restore, set_forward

__all__ = ["patch", "unpatch", "is_patched", "unsupported_reason", "patch_new_layers", "main", "LITGPT_TESTED"]

LITGPT_TESTED = (">=0.5.13", "<0.6")
logger = logging.getLogger(__name__)

# LitGPT's dropout when lora_dropout == 0 is a lambda defined in LoRALayer.__init__; recognised by its code object.
_IDENTITY_CODE = _lora.LoRALayer(r=1, lora_alpha=1, lora_dropout=0.0).lora_dropout.__code__
_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def _dropout_p(layer: nn.Module) -> float | None:
    """The dropout rate the layer applies now (0 in eval mode), or None for a dropout this module does not know."""
    drop = layer.lora_dropout
    if type(drop) is nn.Dropout and not drop.inplace:
        return drop.p if drop.training else 0.0
    if type(drop) is nn.Identity or getattr(drop, "__code__", None) is _IDENTITY_CODE:
        return 0.0
    return None


def qkv_parts(layer: nn.Module) -> list[tuple[int, int, int | None, int]] | None:
    """The parts of a ``LoRAQKVLinear``'s output, in order: ``(row_start, row_end, j, b_start)`` with ``j`` the index
    of the part's rank block in ``lora_A`` (rows ``j·r:(j+1)·r``) and ``b_start`` its first row in ``lora_B``, or
    ``j = None`` for a part without adapter. Adjacent parts without adapter are one part. None when the layer's
    shapes are not LitGPT's layout (then the layer falls back)."""
    q = layer.head_size * layer.n_head
    kv = layer.head_size * layer.n_query_groups
    out = layer.linear.out_features
    if out != q + 2 * kv:
        return None
    parts: list[tuple[int, int, int | None, int]] = []
    j = b = 0
    for (start, end), enabled in zip(((0, q), (q, q + kv), (q + kv, out)), layer.enable_lora):
        if enabled:
            parts.append((start, end, j, b))
            j, b = j + 1, b + end - start
        elif parts and parts[-1][2] is None:
            parts[-1] = (parts[-1][0], end, None, 0)
        else:
            parts.append((start, end, None, 0))
    if (tuple(layer.lora_A.shape) != (layer.r * j, layer.linear.in_features)
            or tuple(layer.lora_B.shape) != (b, layer.r)):
        return None
    return parts


def unsupported_reason(layer: nn.Module, x: torch.Tensor, args=(), kwargs=None) -> str | None:
    """Why this forward call of a LitGPT LoRA layer cannot go through the fused op, or None if it can."""
    if args or kwargs:
        return "extra forward arguments"
    if layer.r == 0 or not hasattr(layer, "lora_A") or not any(getattr(layer, "enable_lora", (True,))):
        return "no adapter (r = 0 or no q/k/v part enabled)"
    if layer.merged:
        return "merged"
    base = layer.linear
    if type(base) is not nn.Linear:  # bitsandbytes / Lightning's quantized linears, or a subclass with its own forward
        return f"base layer {type(base).__name__} (quantized or not a plain nn.Linear)"
    if base.weight.requires_grad:
        return "base weight is trainable"
    if _dropout_p(layer) is None:
        return f"dropout {type(layer.lora_dropout).__name__}"
    if isinstance(layer, _lora.LoRAQKVLinear) and qkv_parts(layer) is None:
        return "q/k/v shapes are not LitGPT's layout"
    W, A, B, bias = base.weight, layer.lora_A, layer.lora_B, base.bias
    tensors = (x, W, A, B) + (() if bias is None else (bias,))
    if any(t.device != x.device for t in tensors):
        return "tensors on different devices"
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        # the op casts every operand to the autocast dtype, as F.linear and matmul do in LitGPT's forward
        if any(t.dtype not in _AUTOCAST_FROM for t in tensors):
            return f"dtypes {sorted({str(t.dtype) for t in tensors})} under autocast"
        return None
    if x.dtype not in _backend.SUPPORTED_DTYPES or W.dtype != x.dtype:
        return f"input dtype {x.dtype} with base weight dtype {W.dtype}"
    if A.dtype != x.dtype or B.dtype != x.dtype:  # LitGPT's own matmuls would fail: keep its behaviour (and error)
        return f"adapter dtypes {A.dtype}/{B.dtype} beside input dtype {x.dtype}"
    if bias is not None and bias.dtype != x.dtype:
        return f"bias dtype {bias.dtype}"
    return None


def _fused_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LoRALinear``: y (..., out) = x Wᵀ + b + s·drop(x) Aᵀ Bᵀ in one op call."""
    base = layer.linear
    return lora_linear(x, base.weight, layer.lora_A, layer.lora_B, float(layer.scaling), bias=base.bias,
                       dropout_p=_dropout_p(layer))


def _fused_qkv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LoRAQKVLinear``: one op call per enabled q/k/v part on views of W, bias, A and B; ``F.linear`` for the rest;
    the parts concatenated to (..., out). One dropout seed for all parts: LitGPT drops the same input entries."""
    base, r, s = layer.linear, layer.r, float(layer.scaling)
    p = _dropout_p(layer)
    seed = int(torch.randint(0, 2**31 - 1, ())) if p > 0 else None
    outs = []
    for start, end, j, b in qkv_parts(layer):
        W = base.weight[start:end]
        bias = None if base.bias is None else base.bias[start:end]
        if j is None:
            outs.append(F.linear(x, W, bias))
        else:
            A = layer.lora_A[j * r:(j + 1) * r]
            B = layer.lora_B[b:b + end - start]
            outs.append(lora_linear(x, W, A, B, s, bias=bias, dropout_p=p, seed=seed))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _fused(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (_fused_qkv if isinstance(layer, _lora.LoRAQKVLinear) else _fused_linear)(layer, x)


def patch(model: nn.Module) -> nn.Module:
    """Route every LitGPT ``LoRALinear`` / ``LoRAQKVLinear`` in ``model`` (``model`` itself included) through
    :func:`loranull_kernels.lora_linear`: its forward and backward, with LitGPT's outputs and gradients.

    Works on a model from ``litgpt.lora.GPT`` built with any of ``lora_query`` / ``lora_key`` / ``lora_value``
    (every subset, grouped-query attention included), ``lora_projection``, ``lora_mlp``, ``lora_head``, in any
    dtype the op supports, under autocast too. A layer whose state the op cannot reproduce keeps LitGPT's forward
    for that call, and logs the reason once (logger ``loranull_kernels.integrations.litgpt``, INFO): merged
    (``merge_lora_weights``), a quantized base (``--quantize bnb.*``: Lightning replaces ``linear`` by a
    bitsandbytes layer), a trainable base (call ``litgpt.lora.mark_only_lora_as_trainable(model)`` first, as
    LitGPT's finetuning scripts do), ``r = 0``, another dropout, mismatched dtypes or devices. Idempotent. Returns
    ``model``. Undo with :func:`unpatch`.
    """
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, _lora.LoRALinear):
            n += set_forward(module, name, unsupported_reason, _fused, logger, "LitGPT")
    logger.info("loranull_kernels: patched %d LitGPT LoRA layer(s) (litgpt %s)", n,
                _version("litgpt"))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore LitGPT's own forward on every layer :func:`patch` changed. Returns ``model``."""
    return restore(model)


_ORIGINAL_INITS: dict[type, object] = {}


def patch_new_layers() -> None:
    """Patch every ``LoRALinear`` / ``LoRAQKVLinear`` built from now on, as its constructor returns: for code that
    builds the model where no :func:`patch` call can reach it (LitGPT's ``finetune_lora`` script, :func:`main`).
    Idempotent. Layers built before are not patched."""
    # LoRAQKVLinear.__init__ calls LoRALayer's, not LoRALinear's: both constructors are wrapped
    for cls in (_lora.LoRALinear, _lora.LoRAQKVLinear):
        if cls in _ORIGINAL_INITS:
            continue
        init = _ORIGINAL_INITS[cls] = cls.__init__

        def __init__(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            patch(self)

        cls.__init__ = __init__


def main(argv: list[str] | None = None) -> None:
    """``python -m loranull_kernels.integrations.litgpt finetune_lora <checkpoint> [options]``: LitGPT's command
    line (``litgpt ...``, same arguments) with every LoRA layer it builds patched onto the fused op."""
    from litgpt.__main__ import main as litgpt_main

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    patch_new_layers()
    litgpt_main()


if __name__ == "__main__":
    main()
