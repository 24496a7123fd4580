"""MiLoRA (Wang et al.): the adapter takes W's r *minor* singular components, the base the top k − r.

Minor components need the full SVD (a randomized SVD finds only the top ones). The reference code uses alpha = r
(s = 1) for MiLoRA: keep that convention when comparing with plain LoRA at alpha = 2r.
"""
import torch

from .base import AdapterInit, Method, split_singular


def initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit:
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    A, B = split_singular(U[:, -r:], S[-r:], Vh[-r:, :], scaling)
    return AdapterInit(lora_A=A, lora_B=B, weight=weight - scaling * (B @ A))


METHOD = Method("milora", initialize, rewrites_base=True)
