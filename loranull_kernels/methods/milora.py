"""MiLoRA (Wang et al.): the adapter takes W's r *minor* singular components, the base the top k − r.

A randomized SVD finds only the top components; the minor ones come from
:func:`~loranull_kernels.nullspace.minor_singular_components` (``method="auto"``): the full SVD for small layers,
else the smallest eigenvectors of the smaller Gram matrix of W by a randomized block Krylov iteration on its inverse
(principal angles to the exact minor subspace: benchmarks/results/nullspace_*.csv). The reference code uses
alpha = r (s = 1) for MiLoRA: keep that convention when comparing with plain LoRA at alpha = 2r.
"""
from .base import AdapterInit, Method, split_singular


def initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit:
    from ..nullspace import minor_singular_components

    U, S, Vh = minor_singular_components(weight, r)
    A, B = split_singular(U.to(weight.dtype), S.to(weight.dtype), Vh.to(weight.dtype), scaling)
    return AdapterInit(lora_A=A, lora_B=B, weight=weight - scaling * (B @ A))


METHOD = Method("milora", initialize, rewrites_base=True)
