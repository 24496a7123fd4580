"""LaLoRA: a Laplace (curvature-weighted) pull of the adapter back to where fine-tuning started (docs/methods.md). The
method is LoRA's initialiser plus this regulariser; the regulariser composes with any initialiser
(``regularizer="lalora"``).

Penalty (:func:`penalty`), over the LoRA factors θ = (A, B) of a layer:
``(λ/2) (θ − θ0)ᵀ (Λ + δI) (θ − θ0)`` with θ0 the adapter when the curvature was estimated (the start of
fine-tuning) and Λ the curvature of the source-domain loss w.r.t. θ (:func:`loranull_kernels.estimate_curvature`):

- ``"diag"``: Λ_A, Λ_B diagonal (mean squared per-batch gradients: the empirical Fisher, or the Fisher when the
  loss samples its labels from the model). Penalty and gradient are elementwise.
- ``"kfac"``: diagonal for A; for B, ``Λ_B = S ⊗ G`` with ``S = E[aaᵀ]`` (r × r; a = s·d ⊙ (A x), B's input) and
  ``G ≈ U diag(σ) Uᵀ`` the top-k eigenpairs of E[ggᵀ] (g = ∂ℓ/∂y, out × out never formed):
  ``vec(ΔB)ᵀ Λ_B vec(ΔB) = tr(ΔBᵀ G ΔB S) = Σ σ ⊙ P ⊙ (P S)`` with ``P = Uᵀ ΔB`` (k × r): two small matmuls, and
  autograd's backward of them is two more (``U (σ ⊙ P S)``, k·r·(out + r) each).

δ (``lalora_prior_precision``) is the Laplace prior precision. At B0 = 0 (LoRA's init) the loss does not depend
on A to first order (∂L/∂A = s·(B0 d)ᵀ(...) = 0), so its estimated curvature is exactly zero: A's whole penalty
is then ``(λδ/2)‖A − A0‖²``, a plain isotropic pull towards its initial value (L2 towards A0) whose strength λδ you
choose, not a data-driven one. Initialisers with B0 ≠ 0 (pissa, milora, lora_null) give A real curvature.

State (saved with the adapter): ``lalora_A0`` / ``lalora_B0`` (θ0, the factors' dtype), ``lalora_FA`` (r, in) and,
for diag, ``lalora_FB`` (out, r); for kfac ``lalora_S`` (r, r), ``lalora_GU`` (out, k), ``lalora_Gs`` (k,); all
curvature in float32. A frozen A (``freeze_A``) never moves and gets no state.
"""
from __future__ import annotations

import torch

from .base import Method, Option, Regularizer, choice, is_int, nonnegative_real
from .lora import initialize

_BUFFERS = ("lalora_A0", "lalora_B0", "lalora_FA", "lalora_FB", "lalora_S", "lalora_GU", "lalora_Gs")


def has_curvature(layer) -> bool:
    return getattr(layer, "lalora_B0", None) is not None


def penalty(layer, config, module_name: str = "") -> torch.Tensor:
    """``(λ/2)(θ − θ0)ᵀ(Λ + δI)(θ − θ0)`` of one layer (0-dim, the adapter's dtype), differentiable w.r.t.
    ``lora_A`` and ``lora_B``; elementwise (diag) or a few (k × out × r, k × r × r) matmuls (kfac).

    Raises:
        RuntimeError: no curvature on the layer (call ``lk.estimate_curvature`` before training).
    """
    if not has_curvature(layer):
        raise RuntimeError(f"LaLoRA: {module_name or 'a layer'} has no curvature estimate; call "
                           "lk.estimate_curvature(model, source_data, ...) before fine-tuning")
    lam, delta = config.lalora_lambda, config.lalora_prior_precision
    B = layer.lora_B
    dB = B - layer.lalora_B0
    if getattr(layer, "lalora_S", None) is not None:
        P = layer.lalora_GU.to(B.dtype).t() @ dB  # (k, r)
        quad_B = (layer.lalora_Gs.to(B.dtype)[:, None] * P * (P @ layer.lalora_S.to(B.dtype))).sum()
        quad_B = quad_B + delta * dB.square().sum()
    else:
        quad_B = ((layer.lalora_FB.to(B.dtype) + delta) * dB.square()).sum()
    total = quad_B
    if layer.lora_A.requires_grad and getattr(layer, "lalora_A0", None) is not None:
        dA = layer.lora_A - layer.lalora_A0
        total = total + ((layer.lalora_FA.to(dA.dtype) + delta) * dA.square()).sum()
    return 0.5 * lam * total


def clear(layer) -> None:
    """Remove every LaLoRA buffer from ``layer`` (a new estimate replaces them all)."""
    for name in _BUFFERS:
        if name in layer._buffers:
            del layer._buffers[name]


def nystrom_eig(Y: torch.Tensor, Omega: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of a PSD matrix M known only through the sketch ``Y = M Ω`` (n × l, Ω n × l with
    orthonormal columns): the stable Nyström approximation (Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3), exact
    when rank(M) ≤ l. Returns ``(U (n, rank), σ (rank,))`` in float64, σ ≥ 0 descending."""
    Y, Omega = Y.to(torch.float64), Omega.to(torch.float64)
    n = Y.shape[0]
    norm = torch.linalg.matrix_norm(Y)
    if norm == 0:
        return Y.new_zeros(n, rank), Y.new_zeros(rank)
    nu = torch.finfo(torch.float64).eps * n * norm  # a shift that makes Ωᵀ Y_ν safely positive definite
    while True:
        Y_nu = Y + nu * Omega
        core = Omega.t() @ Y_nu
        C, info = torch.linalg.cholesky_ex(0.5 * (core + core.t()))  # core = C Cᵀ
        if info == 0:
            break
        nu = nu * 10  # rounding made the core indefinite: a larger shift (subtracted again below)
    E = torch.linalg.solve_triangular(C, Y_nu.t(), upper=False).t()  # Y_ν C⁻ᵀ
    U, S, _ = torch.linalg.svd(E, full_matrices=False)
    sigma = (S.square() - nu).clamp_min(0.0)
    rank = min(rank, U.shape[1])
    return U[:, :rank], sigma[:rank]


class CurvatureAccumulator:
    """Running sums of one layer's curvature over source batches (float32, on the layer's device).

    ``add_gradients(gA, gB)`` takes a batch's gradients (diag Fisher); for kfac, ``add_inputs(a)`` takes B's inputs
    ``a`` (tokens, r) and ``add_output_grads(g)`` the output gradients ``g`` (tokens, out) of the same batch, folded
    at once into S and into the sketch ``Y = Σ gᵀ(g Ω)`` (out × l, l = rank + oversample): no out × out matrix.
    """

    def __init__(self, layer, kind: str, rank: int, oversample: int = 10, generator: torch.Generator | None = None):
        dev, r, out_f = layer.lora_A.device, layer.r, layer.out_features
        f32 = dict(dtype=torch.float32, device=dev)
        self.kind, self.rank, self.batches, self.tokens = kind, rank, 0, 0
        self.FA = torch.zeros(layer.lora_A.shape, **f32) if layer.lora_A.requires_grad else None
        self.FB = torch.zeros(layer.lora_B.shape, **f32) if kind == "diag" else None
        if kind == "kfac":
            width = min(out_f, rank + oversample)
            gauss = torch.randn(out_f, width, generator=generator, dtype=torch.float64)
            self.Omega = torch.linalg.qr(gauss).Q.to(**f32)
            self.S = torch.zeros(r, r, **f32)
            self.Y = torch.zeros(out_f, width, **f32)

    def add_gradients(self, gA: torch.Tensor | None, gB: torch.Tensor | None) -> None:
        self.batches += 1
        if self.FA is not None and gA is not None:
            self.FA.add_(gA.to(torch.float32).square())
        if self.FB is not None and gB is not None:
            self.FB.add_(gB.to(torch.float32).square())

    def add_inputs(self, a: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).to(torch.float32)
        self.S.addmm_(a.t(), a)
        self.tokens += a.shape[0]

    def add_output_grads(self, g: torch.Tensor) -> None:
        g = g.reshape(-1, g.shape[-1]).to(torch.float32)
        self.Y.addmm_(g.t(), g @ self.Omega)

    def store(self, layer) -> None:
        """Write θ0 and the averaged curvature into ``layer``'s buffers (replacing any earlier estimate).

        Normalisation: F = Σ_batches (∇θ)² / n_batches; kfac: ``S = Σ_tokens aaᵀ / n_tokens`` and
        ``G = Σ_tokens ggᵀ / n_batches``, so that ``diag(S ⊗ G)`` matches the diagonal Fisher of per-batch gradients
        when tokens are uncorrelated (∇B = Σ_t g_t a_tᵀ).
        """
        if self.batches == 0:
            raise ValueError("LaLoRA: no source batch was seen; estimate_curvature needs at least one batch")
        clear(layer)
        layer.register_buffer("lalora_A0", layer.lora_A.detach().clone() if self.FA is not None else None)
        layer.register_buffer("lalora_B0", layer.lora_B.detach().clone())
        layer.register_buffer("lalora_FA", None if self.FA is None else self.FA / self.batches)
        if self.kind == "diag":
            layer.register_buffer("lalora_FB", self.FB / self.batches)
            return
        U, sigma = nystrom_eig(self.Y / self.batches, self.Omega, self.rank)
        layer.register_buffer("lalora_S", self.S / max(self.tokens, 1))
        layer.register_buffer("lalora_GU", U.to(torch.float32).contiguous())
        layer.register_buffer("lalora_Gs", sigma.to(torch.float32))


METHOD = Method(
    "lalora", initialize,
    regularizer=Regularizer("lalora", penalty, state_prefix="lalora_"),
    options=(nonnegative_real("lalora_lambda", 1.0), nonnegative_real("lalora_prior_precision", 1e-3),
             choice("lalora_curvature", "diag", ("diag", "kfac")),
             Option("lalora_kfac_rank", 32, lambda v: is_int(v) and v >= 1, "an int ≥ 1")),
)
