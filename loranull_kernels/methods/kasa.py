"""KaSA (Knowledge-aware Singular-value Adaptation): its initialiser and its regulariser (docs/methods.md#kasa).

Initialiser: ``W = U S Vᵀ`` (float32/64); the base keeps the top ``keep`` components and drops the rest; the adapter
starts as LoRA (A kaiming, B = 0) with a trainable per-rank scale ``d ~ N(0, 1)`` (``rank_scale``, carried by the
fused kernel): ``y = W_base x + s B (d ⊙ A x)``. The output changes at init, by design.

- ``kasa_truncation="min"`` (PEFT, default): ``keep = min(in, out) − r``, exactly the r smallest are dropped.
- ``kasa_truncation="in"`` (the reference code's ``in − r``): ``keep = min(in − r, min(in, out))``. On layers wider
  than tall that drops fewer than r components, and none at all when ``out ≤ in − r`` (e.g. a down-projection
  11008 → 4096 with r < 6912): the base is silently left untouched there.

The dropped components are kept as ``lora_A0`` / ``lora_B0`` (``W = W_base + s·B0A0``, zero rows beyond the number
dropped), so the original weight stays recoverable: adapter files rebuild the base from it, and the adapter exports
as a plain LoRA on the original model (rank 2r), which PEFT's own KaSA cannot do.

Regulariser (:func:`penalty`), ``β‖d‖² + γ(‖AAᵀ − I_r‖_F + ‖BᵀB − I_r‖_F)`` per layer:

- ``kasa_regularizer_form="rr"`` (default, PEFT): the r × r Grams, summed over layers;
- ``"reference"``: the reference code's large Grams ``‖AᵀA − I_in‖_F + ‖BBᵀ − I_out‖_F``, with the sum over layers
  divided by their number (:func:`averaged`). Never formed: ``‖AᵀA − I_in‖²_F = ‖AAᵀ‖²_F − 2‖A‖²_F + in
  = ‖AAᵀ − I_r‖²_F + (in − r)`` (the second form has no cancellation), and likewise for B with ``out``.
"""
from __future__ import annotations

import torch

from .._dtypes import compute_dtype
from . import lora
from .base import AdapterInit, Method, Regularizer, choice, nonnegative_real, split_singular


def kept_components(in_features: int, out_features: int, r: int, truncation: str) -> int:
    """How many of W's singular components the base keeps (the rest are dropped)."""
    k = min(in_features, out_features)
    keep = k - r if truncation == "min" else min(in_features - r, k)
    if keep < 1:
        raise ValueError(f"KaSA with r={r} and kasa_truncation={truncation!r} keeps no singular component of a "
                         f"({out_features} × {in_features}) weight: r must be < min(in_features, out_features) = {k}")
    return keep


def initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit:
    out_f, in_f = weight.shape
    keep = kept_components(in_f, out_f, r, config.kasa_truncation)
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    dropped = S.shape[0] - keep  # ≤ r
    A0 = weight.new_zeros(r, in_f)
    B0 = weight.new_zeros(out_f, r)
    if dropped:
        A0[:dropped], B0[:, :dropped] = split_singular(U[:, keep:], S[keep:], Vh[keep:], scaling)
    lora_init = lora.initialize(weight, r, scaling, config, generator=generator)
    d = torch.randn(r, generator=generator, dtype=weight.dtype, device=weight.device)
    return AdapterInit(lora_A=lora_init.lora_A, lora_B=lora_init.lora_B, weight=weight - scaling * (B0 @ A0),
                       rank_scale=d, base_A=A0, base_B=B0)


def _gram_gap_squared(M: torch.Tensor, rows: bool) -> torch.Tensor:
    """``‖MMᵀ − I‖²_F`` (rows=True) or ``‖MᵀM − I‖²_F``, through the small Gram only."""
    r = M.shape[0] if rows else M.shape[1]
    gram = M @ M.t() if rows else M.t() @ M
    eye = torch.eye(r, dtype=M.dtype, device=M.device)
    return (gram - eye).square().sum()


def penalty(layer, config, module_name: str = "") -> torch.Tensor:
    """KaSA's term of one layer (0-dim, float32; float64 for float64 adapters), differentiable w.r.t. ``lora_A``,
    ``lora_B`` and ``rank_scale``. ``"rr"``: ``β‖d‖² + γ(‖AAᵀ − I_r‖_F + ‖BᵀB − I_r‖_F)``. ``"reference"``:
    ``β‖d‖² + γ(‖AᵀA − I_in‖_F + ‖BBᵀ − I_out‖_F)`` (the caller averages it over layers: :func:`averaged`).
    Costs O(r²·(in + out)); no in × in or out × out matrix is built. ``‖d‖²`` is absent without a ``rank_scale``
    (the regulariser on another initialiser)."""
    dt = compute_dtype(layer.lora_A.dtype)
    A, B = layer.lora_A.to(dt), layer.lora_B.to(dt)
    gap_A, gap_B = _gram_gap_squared(A, rows=True), _gram_gap_squared(B, rows=False)
    if config.kasa_regularizer_form == "reference":
        r = A.shape[0]
        gap_A = gap_A + (A.shape[1] - r)
        gap_B = gap_B + (B.shape[0] - r)
    total = config.kasa_gamma * (gap_A.sqrt() + gap_B.sqrt())
    if layer.rank_scale is not None:
        total = total + config.kasa_beta * layer.rank_scale.to(dt).square().sum()
    return total


def averaged(config) -> bool:
    """True when the model-level loss divides the sum of :func:`penalty` over layers by their number."""
    return config.kasa_regularizer_form == "reference"


METHOD = Method(
    "kasa", initialize, rewrites_base=True,  # the output changes at init, by design (d ~ N(0, 1))
    regularizer=Regularizer("kasa", penalty, averaged),
    options=(nonnegative_real("kasa_beta", 1e-4), nonnegative_real("kasa_gamma", 1e-3),
             choice("kasa_truncation", "min", ("min", "in")),
             choice("kasa_regularizer_form", "rr", ("rr", "reference"))),
)
