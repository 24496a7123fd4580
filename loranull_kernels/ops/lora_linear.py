"""``lora_linear``: the fused frozen-base + low-rank linear layer, forward and backward.

``y = x Wᵀ + scaling · (drop(x) (A⊙mask_A)ᵀ ⊙ d) (B⊙mask_B)ᵀ + bias``

Each backend ("torch", "triton") provides a pair of kernels (forward, backward). Both are registered as
``torch.library`` custom ops with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` treats them as
opaque nodes, and each backend gets its own ``torch.autograd.Function`` tying the pair together. The public
function validates the arguments, picks the backend (:mod:`loranull_kernels.backend`), flattens leading
dimensions and draws the dropout seed.
"""
import math
import numbers
from typing import Optional

import torch

from .. import backend as _backend
from . import lora_linear_torch, lora_linear_triton
from .lora_linear_torch import accumulation_dtype

_SEED_LIMIT = 2**63


def _fake_forward(x, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling, dropout_p):
    return (
        x.new_empty(x.shape[0], weight.shape[0]),
        x.new_empty(x.shape[0], lora_A.shape[0], dtype=accumulation_dtype(x.dtype)),
    )


def _fake_backward(dy, x, weight, lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed, scaling, dropout_p,
                   need_dx, need_dA, need_dB, need_drank_scale, need_dbias):
    (M, N), K, r = dy.shape, weight.shape[1], lora_A.shape[0]
    return (  # every output a distinct tensor: custom ops may not return aliases
        dy.new_empty(M, K) if need_dx else dy.new_empty(0),
        lora_A.new_empty(r, K) if need_dA else dy.new_empty(0),
        lora_B.new_empty(N, r) if need_dB else dy.new_empty(0),
        rank_scale.new_empty(r) if need_drank_scale else dy.new_empty(0),
        dy.new_empty(N) if need_dbias else dy.new_empty(0),
    )


def _make_function(name: str, impl) -> type:
    """Register ``impl.forward`` / ``impl.backward`` as custom ops and build the backend's autograd Function."""
    fwd = torch.library.custom_op(f"loranull::lora_linear_fwd_{name}", impl.forward, mutates_args=())
    fwd.register_fake(_fake_forward)
    bwd = torch.library.custom_op(f"loranull::lora_linear_bwd_{name}", impl.backward, mutates_args=())
    bwd.register_fake(_fake_backward)

    def forward(ctx, x, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling, dropout_p, save_x):
        y, h = fwd(x, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling, dropout_p)
        # x is kept only when dA will be computed: with A frozen (LoRA-Null v2) the backward never reads it.
        ctx.save_for_backward(x if save_x else None, weight, lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed)
        ctx.scaling, ctx.dropout_p, ctx.save_x = scaling, dropout_p, save_x
        ctx.has_rank_scale, ctx.has_bias = rank_scale is not None, bias is not None
        return y

    def backward(ctx, dy):
        x, weight, lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dx, need_dA, need_dB = need[0], need[2] and ctx.save_x, need[3]
        need_dd, need_dbias = need[4] and ctx.has_rank_scale, need[5] and ctx.has_bias
        dx, dA, dB, dd, dbias = bwd(dy, x, weight, lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed,
                                    ctx.scaling, ctx.dropout_p, need_dx, need_dA, need_dB, need_dd, need_dbias)
        return (dx if need_dx else None, None, dA if need_dA else None, dB if need_dB else None,
                dd if need_dd else None, dbias if need_dbias else None, None, None, None, None, None, None)

    return type(f"LoRALinear{name.capitalize()}Function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward),
                 "__doc__": f"Autograd of lora_linear on the {name} backend (custom ops loranull::lora_linear_*_{name})."})


FUNCTIONS = {
    "torch": _make_function("torch", lora_linear_torch),
    "triton": _make_function("triton", lora_linear_triton),
}


def _check_tensor(name: str, t, ndim: int, device: torch.device, dtype_ok, dtype_desc: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: all tensors must be on one device")
    if not dtype_ok(t.dtype):
        raise TypeError(f"{name} has dtype {t.dtype}; expected {dtype_desc}")


def _validate(x, weight, lora_A, lora_B, scaling, bias, dropout_p, rank_scale, mask_A, mask_B, train_A, seed):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if x.dtype not in _backend.SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: {', '.join(map(str, _backend.SUPPORTED_DTYPES))}")
    dev, xdt = x.device, x.dtype
    _check_tensor("weight", weight, 2, dev, lambda d: d == xdt, f"x's dtype {xdt}")
    if weight.requires_grad:
        raise ValueError("weight requires grad: lora_linear treats the base weight as frozen "
                         "(call weight.requires_grad_(False), or train it with a plain nn.Linear)")
    out_f, in_f = weight.shape
    if in_f < 1:
        raise ValueError(f"weight has in_features=0 (shape {tuple(weight.shape)}): lora_linear needs in_features ≥ 1")
    if x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension is {x.shape[-1]} but weight has in_features={in_f} (weight shape {tuple(weight.shape)})")
    adapter_ok = lambda d: d in (xdt, torch.float32)  # noqa: E731 - PEFT keeps adapters in fp32 beside half bases
    adapter_desc = f"x's dtype {xdt} or torch.float32"
    _check_tensor("lora_A", lora_A, 2, dev, adapter_ok, adapter_desc)
    _check_tensor("lora_B", lora_B, 2, dev, lambda d: d == lora_A.dtype, f"lora_A's dtype {lora_A.dtype}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError("lora_A has rank 0: lora_A must be (r, in_features) with r ≥ 1")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must be (r, in_features={in_f}), got {tuple(lora_A.shape)}")
    if lora_B.shape != (out_f, r):
        raise ValueError(f"lora_B must be (out_features={out_f}, r={r}), got {tuple(lora_B.shape)}")
    if rank_scale is not None:
        _check_tensor("rank_scale", rank_scale, 1, dev, lambda d: d == lora_A.dtype, f"lora_A's dtype {lora_A.dtype}")
        if rank_scale.shape[0] != r:
            raise ValueError(f"rank_scale must have shape (r={r},), got {tuple(rank_scale.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, dev, lambda d: d == xdt, f"x's dtype {xdt}")
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must have shape (out_features={out_f},), got {tuple(bias.shape)}")
    for name, mask, like in (("mask_A", mask_A, lora_A), ("mask_B", mask_B, lora_B)):
        if mask is not None:
            _check_tensor(name, mask, 2, dev, lambda d: d == torch.bool, "torch.bool")
            if mask.shape != like.shape:
                raise ValueError(f"{name} must have the shape of {'lora_A' if name == 'mask_A' else 'lora_B'} "
                                 f"{tuple(like.shape)}, got {tuple(mask.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(train_A, bool):
        raise TypeError(f"train_A must be a bool, got {type(train_A).__name__}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not 0 <= int(seed) < _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")


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
    weight: torch.Tensor,
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
        weight: (out_features, in_features), x's dtype, frozen (``requires_grad`` must be False).
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
        TypeError / ValueError naming the offending argument for bad types, dtypes, shapes, devices or values.
    """
    autocast = _autocast_dtype(x)
    if autocast is not None:
        # Under autocast (a float32 model trained with bf16/fp16 mixed precision, e.g. HF Trainer's bf16=True) the
        # inputs arrive in mixed dtypes; compute as F.linear would there: every floating operand in the autocast
        # dtype (gradients flow back to float32 parameters through the casts), the op itself outside autocast.
        cast = lambda t: t.to(autocast) if t is not None and t.dtype in _AUTOCAST_FROM else t  # noqa: E731
        x, weight, lora_A, lora_B, rank_scale, bias = map(cast, (x, weight, lora_A, lora_B, rank_scale, bias))
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, rank_scale, mask_A, mask_B,
                               train_A, seed)
    _validate(x, weight, lora_A, lora_B, scaling, bias, dropout_p, rank_scale, mask_A, mask_B, train_A, seed)
    name = _backend.select(x.device, x.dtype)
    dropout_p = float(dropout_p)
    seed_t = None
    if dropout_p > 0:
        seed_t = (torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if seed is None
                  else torch.tensor(int(seed), dtype=torch.int64))
    save_x = bool(train_A and lora_A.requires_grad and torch.is_grad_enabled())
    x2d = x.reshape(-1, x.shape[-1])
    y = FUNCTIONS[name].apply(x2d, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed_t,
                              float(scaling), dropout_p, save_x)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def keep_mask(seed: int, n_rows: int, n_cols: int, dropout_p: float, device, backend: str) -> torch.Tensor:
    """The dense bool dropout keep mask (n_rows, n_cols) that ``backend`` draws for ``seed`` (tests, debugging)."""
    impl = {"torch": lora_linear_torch, "triton": lora_linear_triton}[backend]
    return impl.keep_mask(int(seed), n_rows, n_cols, float(dropout_p), torch.device(device))
