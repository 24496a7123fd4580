"""Argument checks of ``lora_linear``: every error names the offending argument."""
import math
import numbers

import torch

from ... import backend as _backend
from .quantized_weight import QuantizedWeight, check as check_quantized

_SEED_LIMIT = 2**63


def _check_tensor(name: str, t, ndim: int, device: torch.device, dtype_ok, dtype_desc: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: all tensors must be on one device")
    if not dtype_ok(t.dtype):
        raise TypeError(f"{name} has dtype {t.dtype}; expected {dtype_desc}")


def validate(x, weight, lora_A, lora_B, scaling, bias, dropout_p, rank_scale, mask_A, mask_B, train_A, seed):
    """Raise TypeError / ValueError unless the arguments meet :func:`loranull_kernels.ops.lora_linear.lora_linear`'s
    contract (types, dtypes, shapes, one device, value ranges)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if x.dtype not in _backend.SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: {', '.join(map(str, _backend.SUPPORTED_DTYPES))}")
    dev, xdt = x.device, x.dtype
    if isinstance(weight, QuantizedWeight):
        check_quantized(weight, dev)
    elif hasattr(weight, "__tensor_flatten__"):  # a torchao weight reports its logical float dtype: catch it here,
        # not as a dispatch NotImplementedError from inside the custom op
        raise TypeError(f"weight is a {type(weight).__name__} tensor subclass (a quantized weight): pass "
                        f"QuantizedWeight('subclass', weight, {tuple(weight.shape)}) instead")
    else:
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
