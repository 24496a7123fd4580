"""``lora_linear``'s custom ops and autograd: the contract every backend implements, declared once.

Two ``torch.library`` custom ops, ``loranull::lora_linear_fwd`` and ``loranull::lora_linear_bwd``, take the
backend's name as their last argument and run that backend's ``forward`` / ``backward`` (:data:`IMPLEMENTATIONS`).
Their signatures and docstrings below are the contract: every backend module defines ``forward``, ``backward`` and
``keep_mask`` with exactly these parameters, except that the base arrives as one ``weight``: the dense (N, K)
tensor, or the :class:`~.quantized_weight.QuantizedWeight` that the custom-op form ``(weight, wstate, wformat,
wmeta)`` describes (a dataclass cannot cross ``torch.library``). Fake (meta) implementations let
``torch.compile(fullgraph=True)`` treat both as opaque nodes; :class:`LoRALinearFunction` ties them together for autograd.
"""
from typing import Optional

import torch
from torch import Tensor

from . import torch_backend, triton_backend
from .quantized_weight import from_op_args, out_features
from .torch_backend import accumulation_dtype

# Backend name -> module with forward / backward / keep_mask, most preferred first (backend.select's order).
IMPLEMENTATIONS = {"triton": triton_backend, "torch": torch_backend}


@torch.library.custom_op("loranull::lora_linear_fwd", mutates_args=())
def forward_op(x: Tensor, weight: Tensor, wstate: list[Tensor], wformat: str, wmeta: list[int], lora_A: Tensor,
               lora_B: Tensor, rank_scale: Optional[Tensor], bias: Optional[Tensor], mask_A: Optional[Tensor],
               mask_B: Optional[Tensor], seed: Optional[Tensor], scaling: float, dropout_p: float,
               backend: str) -> tuple[Tensor, Tensor]:
    """``backend``'s forward on validated 2-D inputs: x (M, K), weight (N, K) dense (``wformat`` "dense", empty
    ``wstate`` / ``wmeta``) or packed (:meth:`~.quantized_weight.QuantizedWeight.op_args`), lora_A (r, K),
    lora_B (N, r), rank_scale (r,), bias (N,), masks of A's / B's shape, seed a 0-dim int64 tensor (None without
    dropout).

    Returns ``(y (M, N) in x.dtype, H = drop(x) Aᵀ (M, r) in the accumulation dtype)``; H is saved for backward.
    """
    return IMPLEMENTATIONS[backend].forward(x, from_op_args(weight, wstate, wformat, wmeta), lora_A, lora_B,
                                            rank_scale, bias, mask_A, mask_B, seed, scaling, dropout_p)


@forward_op.register_fake
def _(x, weight, wstate, wformat, wmeta, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling, dropout_p,
      backend):
    return (
        x.new_empty(x.shape[0], out_features(weight, wformat, wmeta)),
        x.new_empty(x.shape[0], lora_A.shape[0], dtype=accumulation_dtype(x.dtype)),
    )


@torch.library.custom_op("loranull::lora_linear_bwd", mutates_args=())
def backward_op(dy: Tensor, x: Optional[Tensor], weight: Tensor, wstate: list[Tensor], wformat: str,
                wmeta: list[int], lora_A: Tensor, lora_B: Tensor, rank_scale: Optional[Tensor], h: Tensor,
                mask_A: Optional[Tensor], mask_B: Optional[Tensor], seed: Optional[Tensor], scaling: float,
                dropout_p: float, need_dx: bool, need_dA: bool, need_dB: bool, need_drank_scale: bool,
                need_dbias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``backend``'s backward: dy (M, N), the forward's inputs and H; x is None when dA is not needed.

    Returns ``(dx, dA, dB, d_rank_scale, dbias)``; a gradient not asked for is an empty tensor.
    """
    return IMPLEMENTATIONS[backend].backward(dy, x, from_op_args(weight, wstate, wformat, wmeta), lora_A, lora_B,
                                             rank_scale, h, mask_A, mask_B, seed, scaling, dropout_p, need_dx,
                                             need_dA, need_dB, need_drank_scale, need_dbias)


@backward_op.register_fake
def _(dy, x, weight, wstate, wformat, wmeta, lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed, scaling, dropout_p,
      need_dx, need_dA, need_dB, need_drank_scale, need_dbias, backend):
    (M, N), K, r = dy.shape, lora_A.shape[1], lora_A.shape[0]
    return (  # every output a distinct tensor: custom ops may not return aliases
        dy.new_empty(M, K) if need_dx else dy.new_empty(0),
        lora_A.new_empty(r, K) if need_dA else dy.new_empty(0),
        lora_B.new_empty(N, r) if need_dB else dy.new_empty(0),
        rank_scale.new_empty(r) if need_drank_scale else dy.new_empty(0),
        dy.new_empty(N) if need_dbias else dy.new_empty(0),
    )


class LoRALinearFunction(torch.autograd.Function):
    """Autograd of ``lora_linear`` on any backend: :func:`forward_op` forward, :func:`backward_op` backward.

    ``apply(x, weight, wstate, wformat, wmeta, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling,
    dropout_p, save_x, backend)``; ``save_x`` False (A frozen) keeps x out of the saved tensors and skips dA.
    ``wformat`` "subclass" (a torchao weight): the tensor subclass cannot enter the custom ops (its dispatch does
    not know them), so it is dequantized here, in the forward and again in the backward when dX is needed; only the
    quantized tensor is saved, never its dense copy.
    """

    @staticmethod
    def forward(ctx, x, weight, wstate, wformat, wmeta, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed,
                scaling, dropout_p, save_x, backend):
        ctx.wformat, ctx.wmeta, ctx.n_wstate = wformat, list(wmeta), len(wstate)
        if wformat == "subclass":
            w, state, fmt = weight.dequantize().to(x.dtype), [], "dense"
        else:
            w, state, fmt = weight, wstate, wformat
        y, h = forward_op(x, w, state, fmt, wmeta, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling,
                          dropout_p, backend)
        del w
        # x is kept only when dA will be computed: with A frozen (LoRA-Null v2) the backward never reads it.
        ctx.save_for_backward(x if save_x else None, weight, *wstate, lora_A, lora_B, rank_scale, h, mask_A, mask_B,
                              seed)
        ctx.scaling, ctx.dropout_p, ctx.save_x, ctx.backend = scaling, dropout_p, save_x, backend
        ctx.has_rank_scale, ctx.has_bias = rank_scale is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, *rest = ctx.saved_tensors
        wstate, (lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed) = rest[:ctx.n_wstate], rest[ctx.n_wstate:]
        need = ctx.needs_input_grad
        need_dx, need_dA, need_dB = need[0], need[5] and ctx.save_x, need[6]
        need_dd, need_dbias = need[7] and ctx.has_rank_scale, need[8] and ctx.has_bias
        fmt = ctx.wformat
        if fmt == "subclass":
            # Only dX reads W: without it, a storage-free stand-in of W's shape (the whole matrix is not dequantized)
            n, k = ctx.wmeta[0], ctx.wmeta[1]
            weight = weight.dequantize().to(dy.dtype) if need_dx else dy.new_zeros(()).expand(n, k)
            fmt = "dense"
        dx, dA, dB, dd, dbias = backward_op(dy, x, weight, wstate, fmt, ctx.wmeta, lora_A, lora_B, rank_scale, h,
                                            mask_A, mask_B, seed, ctx.scaling, ctx.dropout_p, need_dx, need_dA,
                                            need_dB, need_dd, need_dbias, ctx.backend)
        return (dx if need_dx else None, None, None, None, None, dA if need_dA else None, dB if need_dB else None,
                dd if need_dd else None, dbias if need_dbias else None, None, None, None, None, None, None, None)
