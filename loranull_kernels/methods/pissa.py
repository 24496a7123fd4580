"""PiSSA: the adapter takes W's top-r singular components, the base keeps the rest (for comparison with MiLoRA,
which takes the minor ones). Only the top components are needed, so the randomized SVD (``lk.rsvd``) does it."""
from .base import AdapterInit, Method, nonnegative_int, split_singular


def initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit:
    from ..ops.rsvd import rsvd

    U, S, Vh = rsvd(weight, r, oversample=config.pissa_oversample, n_iter=config.pissa_n_iter,
                    seed=config.init_seed if config.init_seed is not None else 0)
    U, S, Vh = (t.to(weight.dtype) for t in (U, S, Vh))
    A, B = split_singular(U, S, Vh, scaling)
    return AdapterInit(lora_A=A, lora_B=B, weight=weight - scaling * (B @ A))


METHOD = Method("pissa", initialize, rewrites_base=True,
                options=(nonnegative_int("pissa_oversample", 16), nonnegative_int("pissa_n_iter", 4)))
