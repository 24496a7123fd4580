"""LoRA-Null: initialise the adapter in the null space of the pre-trained activations (docs/methods.md#lora-null).

With C the layer's (uncentred) input covariance over knowledge-like calibration data and Q its ``null_dim``
smallest eigenvectors (in × null_dim):

- ``init="svd"`` (the reference default): the adapter is the top-r SVD of ``T = W Q Qᵀ`` with S divided by s, so
  the rows of A0 span (part of) span(Q) and ``A0 x ≈ 0`` on knowledge-like x; the base becomes ``W − s·B0A0``
  (``= W (I − QQᵀ)`` when null_dim = r). Since ``T = (WQ) Qᵀ`` with orthonormal Q, its SVD is that of the small
  ``WQ`` (out × null_dim) with the right factor mapped back through Q: exact, and cheaper than a randomized SVD.
- ``init="basis"``: ``A0 = Qᵀ``, ``B0 = 0``, base unchanged.

v2 (``freeze_A=True``) trains B only, so every update ``(B − B0) A0`` keeps its row space in span(Q).
"""
from __future__ import annotations

import torch

from .base import AdapterInit, Method, Option, choice, flag, is_int, split_singular


def null_basis(covariance: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal basis (in × k) of the k smallest eigenvectors of a symmetric covariance, in ``dtype``
    (:func:`~loranull_kernels.nullspace.smallest_eigenvectors`, ``method="auto"``; a basis computed ahead by
    :func:`solve_null_spaces` under :class:`~loranull_kernels.nullspace.precomputed` is reused)."""
    from ..nullspace import smallest_eigenvectors

    return smallest_eigenvectors(covariance, k, dtype=dtype)[1]  # (eigenvalues, vectors): keep the vectors


# Same-shape covariances solved per batched call: bounds the stacked copy (and its float64 workspace) to this many.
MAX_BATCH = 8


def solve_null_spaces(covariances, k: int, dtype: torch.dtype) -> tuple[list, str]:
    """The k smallest eigenpairs of every distinct covariance (by identity: q/k/v's shared tensor is solved once),
    same-shape ones stacked into batched calls of at most :data:`MAX_BATCH`.

    Args:
        covariances: iterable of (in, in) tensors (repeats allowed). k: null-space dimension. dtype: float32 or
            float64, as :func:`~loranull_kernels.nullspace.smallest_eigenvectors`.
    Returns:
        ``(solved, note)``: ``[(C, values (k,), Q (in, k))]`` for :class:`~loranull_kernels.nullspace.precomputed`,
        and a one-line summary of the solver "auto" picked per size (for progress output), e.g.
        ``"null space: randomized ×3 (n=4096), eigh ×1 (n=64)"``.
    """
    from ..nullspace import pick_method, smallest_eigenvectors

    distinct = list({id(C): C for C in covariances}.values())
    groups: dict[tuple, list] = {}
    for C in distinct:
        groups.setdefault((tuple(C.shape), C.device), []).append(C)
    solved, parts = [], []
    for (shape, _), Cs in sorted(groups.items(), key=lambda g: g[0][0]):
        n = shape[-1]
        parts.append(f"{pick_method(n, k)} ×{len(Cs)} (n={n})")
        for i in range(0, len(Cs), MAX_BATCH):
            chunk = Cs[i:i + MAX_BATCH]
            values, Q = smallest_eigenvectors(torch.stack(chunk), k, dtype=dtype)
            solved += [(C, values[j], Q[j]) for j, C in enumerate(chunk)]
    return solved, "null space: " + ", ".join(parts)


def initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit:
    if covariance is None:
        raise ValueError("method 'lora_null' needs the layer's input covariance: run lk.calibrate / pass "
                         "calibration_data to lk.inject")
    in_f = weight.shape[1]
    if covariance.shape != (in_f, in_f):
        raise ValueError(f"covariance must be (in_features, in_features) = ({in_f}, {in_f}), got {tuple(covariance.shape)}")
    k = config.null_dim or r
    Q = null_basis(covariance, k, weight.dtype)  # (in, k)
    if config.lora_null_init == "basis":
        A = Q[:, :r].t().contiguous()
        B = torch.zeros(weight.shape[0], r, dtype=weight.dtype, device=weight.device)
        return AdapterInit(lora_A=A, lora_B=B, weight=weight)
    Uw, S, Vh_small = torch.linalg.svd(weight @ Q, full_matrices=False)  # WQ = U S Ṽᵀ  ⇒  T = U S (QṼ)ᵀ
    Vh = Vh_small[:r] @ Q.t()
    A, B = split_singular(Uw[:, :r], S[:r], Vh, scaling)
    return AdapterInit(lora_A=A, lora_B=B, weight=weight - scaling * (B @ A))




def check_config(config) -> None:
    if config.null_dim is not None and (not is_int(config.null_dim) or config.null_dim < config.r):
        raise ValueError(f"AdapterConfig.null_dim must be an int ≥ r={config.r} or None, got {config.null_dim!r}")
    if config.lora_null_init == "basis" and config.null_dim not in (None, config.r):
        raise ValueError("AdapterConfig.lora_null_init='basis' (A0 = Qᵀ) needs null_dim = r")


def check_layer(config, in_features: int, out_features: int) -> str | None:
    if config.null_dim is not None and config.null_dim > in_features:
        # the null space Q is (in, null_dim); the caller appends the layer: "... in_features=16 of layer 'q_proj'"
        return f"AdapterConfig.null_dim={config.null_dim} exceeds in_features={in_features}"
    return None


def solve_calibration(covariances, config, dtype: torch.dtype) -> tuple[list, str]:
    """:func:`solve_null_spaces` of a group of layers at the config's null-space dimension."""
    return solve_null_spaces(covariances, config.null_dim or config.r, dtype)


METHOD = Method(
    "lora_null", initialize, needs_calibration=True, rewrites_base=True,
    options=(Option("null_dim", None, lambda v: v is None or is_int(v), "an int ≥ r or None"),
             choice("lora_null_init", "svd", ("svd", "basis")),
             flag("normalize_calibration", False)),
    check_config=check_config, check_layer=check_layer, solve_calibration=solve_calibration,
    base_unchanged=lambda config: config.lora_null_init == "basis",
)
