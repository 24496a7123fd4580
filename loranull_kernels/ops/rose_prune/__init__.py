"""``rose_prune_``: RoseLoRA's per-step update of one layer, in place (importance EMA, top-k masks, zeroing, clamp).

For A (r, in) the selection groups are its rows, for B (out, r) its columns ("lines"). Per line of n entries:

1. ``Ī ← β·Ī + (1 − β)·|p ⊙ ∇p|`` with β = 0 on the first update (``count == 0``: Ī = I), ``ema`` afterwards;
2. if ``prune``: the ``n_prune`` entries of smallest Ī (ties: lowest index first) get ``mask = False`` and ``p = 0``,
   the others ``mask = True``; then p is clamped to ``±clamp`` when one is given.

``count`` is not incremented here (the caller does, once per layer). Validation and dispatch live here; the
backends (:data:`IMPLEMENTATIONS`) are ``triton_backend.py``, all of it in one kernel launch per layer
(``triton_kernels.py``: one pass over the entries for lines of up to ``triton_backend.MAX_BLOCK`` entries, chunked
passes over longer ones), and ``torch_backend.py``, the fallback and the reference. Both choose the same entries
for the same importances.

Not a ``torch.library`` custom op, unlike the other ops: it runs between optimizer steps under ``no_grad``, never
inside a traced or compiled graph, so registration would buy nothing; its interface of two optional factors of
four tensors each (three of them written in place) would need eight optional mutable arguments in the schema.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ... import backend
from . import torch_backend, triton_backend

# Backend name -> module with rose_prune_(count, ema, A, B, n_prune_A, n_prune_B, prune, clamp), most preferred first.
IMPLEMENTATIONS = {"triton": triton_backend, "torch": torch_backend}


class RoseTensors(NamedTuple):
    """One adapter factor and its RoseLoRA state, all of the factor's shape (A: (r, in), B: (out, r))."""

    param: torch.Tensor  # the factor, updated in place (float16/bfloat16/float32/float64)
    grad: torch.Tensor  # its (accumulated) gradient, param's dtype
    importance: torch.Tensor  # Ī, float32, updated in place
    mask: torch.Tensor  # bool, written when pruning


def _check(name: str, t: RoseTensors, device: torch.device) -> None:
    p, g, imp, m = t
    if p.dim() != 2:
        raise ValueError(f"{name}.param must be 2-D, got shape {tuple(p.shape)}")
    for field, x in (("grad", g), ("importance", imp), ("mask", m)):
        if x.shape != p.shape:
            raise ValueError(f"{name}.{field} has shape {tuple(x.shape)}, expected the param's {tuple(p.shape)}")
        if x.device != device:
            raise ValueError(f"{name}.{field} is on {x.device}, the count on {device}")
    for field, x in (("param", p), ("importance", imp), ("mask", m)):
        if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
            # Updated in place, one entry per element: an expanded (stride 0) view would alias them.
            raise ValueError(f"{name}.{field} is an expanded view (strides {tuple(x.stride())}); it is updated in "
                             "place and needs one element per entry")
    if g.dtype != p.dtype:
        raise TypeError(f"{name}.grad has dtype {g.dtype}, expected the param's {p.dtype}")
    if imp.dtype != torch.float32:
        raise TypeError(f"{name}.importance must be float32, got {imp.dtype}")
    if m.dtype != torch.bool:
        raise TypeError(f"{name}.mask must be bool, got {m.dtype}")


@torch.no_grad()
def rose_prune_(count: torch.Tensor, ema: float, A: Optional[RoseTensors] = None, B: Optional[RoseTensors] = None,
                *, n_prune_A: int = 0, n_prune_B: int = 0, prune: bool = True,
                clamp: Optional[float] = None) -> None:
    """RoseLoRA's update of one layer, in place (see the module docstring).

    Args:
        count: 0-dim int64, the number of earlier updates of this layer (0: the EMA starts at the current importance).
        ema: the EMA decay in [0, 1) (RoseLoRA: 0.8).
        A: ``RoseTensors`` of lora_A (r, in), lines = rows; None when A is frozen.
        B: ``RoseTensors`` of lora_B (out, r), lines = columns; None to skip B.
        n_prune_A, n_prune_B: entries pruned per line of A / of B (0 ≤ n ≤ line length).
        prune: False updates the importance only (the schedule's τ_t = 1 phase).
        clamp: clamp the factors to ``±clamp`` after pruning; None does not.
    """
    if A is None and B is None:
        return
    if not (isinstance(count, torch.Tensor) and count.dim() == 0 and count.dtype == torch.int64):
        raise TypeError("count must be a 0-dim int64 tensor")
    for name, t, n, length in (("A", A, n_prune_A, None if A is None else A.param.shape[1]),
                               ("B", B, n_prune_B, None if B is None else B.param.shape[0])):
        if t is None:
            continue
        _check(name, t, count.device)
        if not 0 <= n <= length:
            raise ValueError(f"n_prune_{name}={n} must be in [0, {length}] (the length of {name}'s lines)")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    some = A if A is not None else B
    if clamp is not None:  # the bound as the factor stores it: both backends then clamp to the same value
        clamp = float(torch.tensor(float(clamp), dtype=some.param.dtype))
    name = backend.select(count.device, some.param.dtype, among=tuple(IMPLEMENTATIONS))
    IMPLEMENTATIONS[name].rose_prune_(count, ema, A, B, n_prune_A, n_prune_B, prune, clamp)
