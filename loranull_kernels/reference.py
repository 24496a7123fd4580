"""Plain PyTorch reference of every op, written for clarity, not speed.

Tests compare each backend against these functions evaluated on float64 copies of the inputs; benchmarks use them
as the "naive PyTorch" provider and to check each provider's output before timing it. They are differentiable
through ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0, rank_scale: torch.Tensor | None = None,
                mask_A: torch.Tensor | None = None, mask_B: torch.Tensor | None = None,
                keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x Wᵀ + scaling · (drop(x) (A⊙mask_A)ᵀ ⊙ d) (B⊙mask_B)ᵀ + bias``.

    Args:
        x: (..., in). weight: (out, in). lora_A: (r, in). lora_B: (out, r). rank_scale ``d``: (r,) or None.
        mask_A / mask_B: bool, shapes of A / B, or None.
        keep_mask: bool (..., in), the dropout keep mask to apply (scaled by 1/(1-dropout_p)); when None and
            dropout_p > 0, ``F.dropout`` draws a fresh one (the naive LoRA of most code bases).
    Returns:
        (..., out), dtype of x.
    """
    A = lora_A if mask_A is None else lora_A * mask_A
    B = lora_B if mask_B is None else lora_B * mask_B
    if keep_mask is not None:
        xd = x * keep_mask / (1.0 - dropout_p)
    elif dropout_p > 0:
        xd = F.dropout(x, dropout_p, training=True)
    else:
        xd = x
    h = F.linear(xd, A)
    if rank_scale is not None:
        h = h * rank_scale
    return F.linear(x, weight, bias) + scaling * F.linear(h, B)


def dequantize(weight) -> torch.Tensor:
    """A :class:`~loranull_kernels.ops.lora_linear.quantized_weight.QuantizedWeight` as its (out, in) float64
    matrix, element by element as the format defines it (independent of the fast dequantization paths)."""
    if weight.format == "subclass":
        return weight.data.dequantize().to(torch.float64)
    N, K = weight.shape
    if weight.format == "int8":
        return weight.data.to(torch.float64) * weight.absmax.to(torch.float64)[:, None] / 127.0
    e = torch.arange(N * K, device=weight.data.device)
    byte = weight.data.reshape(-1)[e // 2].to(torch.int64)
    nibble = torch.where(e % 2 == 0, byte >> 4, byte & 15)
    block = e // weight.blocksize
    if weight.nested:
        scale = (weight.absmax_code.to(torch.float64)[weight.absmax.to(torch.int64)[block]]
                 * weight.absmax_scale.to(torch.float64)[block // weight.absmax_blocksize]
                 + weight.absmax_offset.to(torch.float64))
    else:
        scale = weight.absmax.to(torch.float64)[block]
    return (weight.code.to(torch.float64)[nibble] * scale).view(N, K)


def covariance_update(C: torch.Tensor, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``C + Σ_t x_tᵀ x_t`` over the tokens kept by ``token_mask``, in float64; functional (C is not modified).

    Args: C (in, in); x (..., in); token_mask bool ``x.shape[:-1]`` or None. Returns (in, in) float64.
    """
    x2d = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    if token_mask is not None:
        x2d = x2d[token_mask.reshape(-1)]
    return C.detach().to(torch.float64) + x2d.t() @ x2d


def project_out(M: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """``M (I − QQᵀ)`` formed explicitly in float64. M (..., m, n); Q (..., n, k) with orthonormal columns, or None."""
    M = M.detach().to(torch.float64)
    if Q is None:
        return M
    Q = Q.detach().to(torch.float64)
    return M - (M @ Q) @ Q.transpose(-1, -2)


def truncated_svd(M: torch.Tensor, rank: int, project_out_Q: torch.Tensor | None = None):
    """The exact best rank-``rank`` factors of ``M (I − QQᵀ)`` by a full float64 SVD (Eckart–Young).

    Returns ``U (..., m, rank), S (..., rank), Vh (..., rank, n)`` and ``tail (...)``, the optimal squared Frobenius
    error ``Σ_{i > rank} σ_i²`` that any rank-``rank`` approximation is measured against.
    """
    A = project_out(M, project_out_Q)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    tail = (S[..., rank:] ** 2).sum(-1)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :], tail


def approximation_error(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                        project_out_Q: torch.Tensor | None = None) -> torch.Tensor:
    """``‖M (I − QQᵀ) − U diag(S) Vh‖²_F`` in float64, per matrix of the batch: shape ``M.shape[:-2]``."""
    A = project_out(M, project_out_Q)
    R = A - (U.to(torch.float64) * S.to(torch.float64).unsqueeze(-2)) @ Vh.to(torch.float64)
    return (R ** 2).sum((-2, -1))


def null_space_krylov(C: torch.Tensor, k: int, start: torch.Tensor, n_blocks: int, delta: float):
    """The randomized null-space solver's steps in float64, written plainly: with ``M = (C + δI)⁻¹``, the blocks
    ``Q₁ = orth(M · start)`` and ``Q_{i+1} = orth((I − KKᵀ) M Q_i)`` (K the blocks so far), ``n_blocks`` of them,
    then Rayleigh–Ritz on M in ``span(K)``. Returns ``(values (k,) ascending = 1/θ − δ, projector (n, n) onto the k
    Ritz vectors)``; the projector is what a correct implementation must reproduce (the vectors themselves are
    defined up to sign and rotation)."""
    n = C.shape[-1]
    M = torch.linalg.inv(C.double() + delta * torch.eye(n, dtype=torch.float64))
    Y = M @ start.double()
    blocks = []
    for _ in range(n_blocks):
        if blocks:
            K = torch.cat(blocks, 1)
            Y = Y - K @ (K.t() @ Y)
        blocks.append(torch.linalg.qr(Y).Q)
        Y = M @ blocks[-1]
    K = torch.linalg.qr(torch.cat(blocks, 1)).Q
    theta, V = torch.linalg.eigh(K.t() @ M @ K)
    vectors = K @ V[:, -k:]
    return (1.0 / theta[-k:] - delta).flip(0), vectors @ vectors.t()
