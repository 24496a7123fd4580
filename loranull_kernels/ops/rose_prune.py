"""``rose_prune_``: RoseLoRA's per-step update of one layer, in place (importance EMA, top-k masks, zeroing, clamp).

For A (r, in) the selection groups are its rows, for B (out, r) its columns ("lines"). Per line of n entries:

1. ``Ī ← β·Ī + (1 − β)·|p ⊙ ∇p|`` with β = 0 on the first update (``count == 0``: Ī = I), ``ema`` afterwards;
2. if ``prune``: the ``n_prune`` entries of smallest Ī (ties: lowest index first) get ``mask = False`` and ``p = 0``,
   the others ``mask = True``; then p is clamped to ``±clamp`` when one is given.

``count`` is not incremented here (the caller does, once per layer). The Triton backend does all of it in one
kernel launch per layer (:mod:`loranull_kernels.triton.rose_prune`): one pass over the entries for lines of up to
``MAX_BLOCK`` entries, chunked passes over longer ones; the torch backend is the fallback and the reference. Both
choose the same entries for the same importances.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .. import backend


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


def _torch_lines(t: RoseTensors, beta: torch.Tensor, n_prune: int, prune: bool, clamp: Optional[float]) -> None:
    """The update on views whose rows are the lines (B is passed transposed)."""
    p, g, imp, mask = t
    current = (p.to(torch.float32) * g.to(torch.float32)).abs()
    imp.copy_(imp * beta + current * (1.0 - beta))  # the kernel's order of operations: bit-identical EMA
    if not prune:
        return
    pruned = torch.sort(imp, dim=1, stable=True).indices[:, :n_prune]
    keep = torch.ones_like(mask)
    keep.scatter_(1, pruned, False)
    mask.copy_(keep)
    p.masked_fill_(~keep, 0)
    if clamp is not None:
        p.clamp_(-clamp, clamp)


@functools.lru_cache(maxsize=None)
def _kernel():
    from ..triton.rose_prune import rose_prune_kernel

    return rose_prune_kernel


# The longest line held whole in registers: 8192 entries at 16 warps is 16 a thread. Longer lines are streamed in
# chunks of half this length at the same 16 warps (16384 whole at 32 warps spilled on sm_90, and so did 8192-long
# chunks of an 11007-long line, whose unaligned rows take a 64-bit address per entry: compile_check --report).
# Tests lower it to reach the streaming path at small sizes under the interpreter.
MAX_BLOCK = 8192


def _block(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _launch_block(n: int) -> tuple[int, bool]:
    """(BLOCK, LONG) for lines of length ``n``: the whole line, or ``MAX_BLOCK // 2``-long chunks of a line longer
    than ``MAX_BLOCK``."""
    block = _block(n)
    return (block, False) if block <= MAX_BLOCK else (MAX_BLOCK // 2, True)


def _warps(block: int) -> int:
    return min(32, max(4, block // 512))


def _launch_options(a: tuple[int, bool], b: tuple[int, bool]) -> dict:
    """``num_warps`` and ``maxnreg`` of a launch whose factors take ``_launch_block``'s ``a`` and ``b``.

    bool masks are written as bytes; a whole line lives in registers, so wide ones get more warps: at most 16
    entries a thread (32 spilled on sm_90, compile_check --report); a streamed line gets the warps of the longest
    whole one. ``maxnreg`` is the register file's share of a thread (capped at 255): left unset, ptxas held a
    16-warp launch to 64 registers and spilled 8 B (an 11008-long streamed line beside 4096-long ones), given it,
    80 and no spill. Few programs run, so the occupancy ptxas traded for does not matter here.
    """
    warps = _warps(max(MAX_BLOCK if long else block for block, long in (a, b)))
    return dict(num_warps=warps, maxnreg=min(255, 65536 // (32 * warps)))


def _triton(count, ema, A, B, n_prune_A, n_prune_B, prune, clamp) -> None:
    some = A if A is not None else B
    dummy = RoseTensors(some.importance, some.importance, some.importance, some.mask)
    a, b = A or dummy, B or dummy
    lines_a = a.param.shape[0] if A is not None else 0
    lines_b = b.param.shape[1] if B is not None else 0
    n_a = a.param.shape[1] if A is not None else 1
    n_b = b.param.shape[0] if B is not None else 1
    (block_a, long_a), (block_b, long_b) = _launch_block(n_a), _launch_block(n_b)
    ma, mb = a.mask.view(torch.uint8), b.mask.view(torch.uint8)
    _kernel()[(lines_a + lines_b,)](
        a.param, a.grad, a.importance, ma, b.param, b.grad, b.importance, mb, count,
        lines_a, n_a, n_b,
        *a.param.stride(), *a.grad.stride(), *a.importance.stride(), *ma.stride(),
        *b.param.stride(), *b.grad.stride(), *b.importance.stride(), *mb.stride(),
        float(ema), int(n_prune_A), int(n_prune_B), float(clamp or 0.0),
        PRUNE=bool(prune), CLAMP=clamp is not None, BLOCK_A=block_a, BLOCK_B=block_b, LONG_A=long_a, LONG_B=long_b,
        **_launch_options((block_a, long_a), (block_b, long_b)),
    )


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
    if backend.select(count.device, some.param.dtype) == "triton":
        _triton(count, ema, A, B, n_prune_A, n_prune_B, prune, clamp)
        return
    beta = torch.where(count == 0, 0.0, float(ema)).to(torch.float32)
    if A is not None:
        _torch_lines(A, beta, n_prune_A, prune, clamp)
    if B is not None:
        _torch_lines(RoseTensors(*(x.t() for x in B)), beta, n_prune_B, prune, clamp)
