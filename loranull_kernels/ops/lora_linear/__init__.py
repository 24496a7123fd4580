"""``lora_linear``: the fused frozen-base + low-rank linear layer, forward and backward.

``y = x Wᵀ + scaling · (drop(x) (A⊙mask_A)ᵀ ⊙ d) (B⊙mask_B)ᵀ + bias``

The public function validates the arguments (:mod:`.validation`), picks the backend
(:func:`loranull_kernels.backend.select` among :data:`.autograd.IMPLEMENTATIONS`), flattens leading dimensions,
draws the dropout seed and calls :class:`.autograd.LoRALinearFunction`, whose custom ops run the chosen backend:
``torch_backend.py`` (PyTorch), ``triton_backend.py`` (the launcher of ``triton_kernels.py``). The base is a dense
tensor or a :class:`.quantized_weight.QuantizedWeight` (a 4-bit / 8-bit base kept quantized).
"""
from typing import Optional

import torch

from ... import backend as _backend
from .autograd import IMPLEMENTATIONS, LoRALinearFunction
from .quantized_weight import QuantizedWeight, op_args
from .validation import validate


_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)  # float64 stays float64 under autocast, as in torch


def _autocast_dtype(x) -> torch.dtype | None:
    """The autocast dtype in force for x's device, or None (autocast off, or x not a tensor)."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda"):
        return None
    if not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rank_scale: Optional[torch.Tensor] = None,
    mask_A: Optional[torch.Tensor] = None,
    mask_B: Optional[torch.Tensor] = None,
    train_A: bool = True,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Frozen linear layer plus a low-rank adapter, in PEFT's weight layout, forward and backward fused.

    ``y = x Wᵀ + scaling · (drop(x) (A⊙mask_A)ᵀ ⊙ rank_scale) (B⊙mask_B)ᵀ + bias``

    Args:
        x: (..., in_features); float16, bfloat16, float32 (float64 on the torch backend). Any strides.
        weight: (out_features, in_features), x's dtype, frozen (``requires_grad`` must be False); or a
            :class:`QuantizedWeight` (a bitsandbytes NF4 / FP4 / int8 or torchao base, any x dtype): the Triton
            kernels dequantize its tiles inside the GEMMs, the torch backend the whole matrix per call, and no
            dense copy is kept for the backward (docs/design.md#quantized-bases).
        lora_A: (r, in_features); x's dtype or float32 (PEFT keeps adapters in float32 beside half-precision
            bases). lora_B: (out_features, r), lora_A's dtype.
        scaling: the adapter scale s (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
        bias: (out_features,) or None, x's dtype; trainable if it requires grad.
        dropout_p: dropout probability in [0, 1) on the adapter path's input only. The mask is not stored: the
            backward regenerates it from the seed.
        rank_scale: (r,) or None: a per-rank scale d (KaSA's trainable singular values); lora_A's dtype.
        mask_A, mask_B: bool masks of lora_A's / lora_B's shape or None (RoseLoRA): the adapter uses A⊙mask_A and
            B⊙mask_B, and masked entries get zero gradient.
        train_A: False treats lora_A as frozen whatever its ``requires_grad`` (LoRA-Null v2): no dA is computed
            and x is not kept for the backward.
        seed: dropout seed in [0, 2**63). None draws one from torch's default CPU generator (so
            ``torch.manual_seed`` makes runs repeatable and activation checkpointing replays the same mask). The
            same seed on the same backend and shape gives a bit-identical mask; the two backends draw different
            masks.

    Returns:
        (..., out_features) in x's dtype. Differentiable w.r.t. x, lora_A, lora_B, rank_scale and bias.
        Under ``torch.autocast``: every float16/bfloat16/float32 operand is cast to the autocast dtype first (as
        ``F.linear`` does there), so the output is in that dtype and float32 parameters get float32 gradients.

    Raises:
        TypeError, ValueError: naming the offending argument, for bad types, dtypes, shapes, devices or values.
    """
    autocast = _autocast_dtype(x)
    if autocast is not None:
        # Under autocast (a float32 model trained with bf16/fp16 mixed precision, e.g. HF Trainer's bf16=True) the
        # inputs arrive in mixed dtypes; compute as F.linear would there: every floating operand in the autocast
        # dtype (gradients flow back to float32 parameters through the casts), the op itself outside autocast.
        cast = lambda t: t.to(autocast) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_FROM else t  # noqa: E731
        x, weight, lora_A, lora_B, rank_scale, bias = map(cast, (x, weight, lora_A, lora_B, rank_scale, bias))
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, rank_scale, mask_A, mask_B,
                               train_A, seed)
    validate(x, weight, lora_A, lora_B, scaling, bias, dropout_p, rank_scale, mask_A, mask_B, train_A, seed)
    name = _backend.select(x.device, x.dtype, among=tuple(IMPLEMENTATIONS))
    dropout_p = float(dropout_p)
    seed_t = None
    if dropout_p > 0:
        seed_t = (torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if seed is None
                  else torch.tensor(int(seed), dtype=torch.int64))
    save_x = bool(train_A and lora_A.requires_grad and torch.is_grad_enabled())
    x2d = x.reshape(-1, x.shape[-1])
    y = LoRALinearFunction.apply(x2d, *op_args(weight), lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed_t,
                                 float(scaling), dropout_p, save_x, name)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def keep_mask(seed: int, n_rows: int, n_cols: int, dropout_p: float, device, backend: str) -> torch.Tensor:
    """The dense bool dropout keep mask (n_rows, n_cols) that ``backend`` draws for ``seed`` (tests, debugging)."""
    return IMPLEMENTATIONS[backend].keep_mask(int(seed), n_rows, n_cols, float(dropout_p), torch.device(device))
