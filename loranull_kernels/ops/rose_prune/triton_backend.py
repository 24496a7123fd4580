"""The Triton backend of ``rose_prune_``: the launch rules (block, chunk, warps, registers) and the launcher of
:mod:`.triton_kernels` (imported on first launch, so the package imports where Triton cannot)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _kernel():
    from .triton_kernels import rose_prune_kernel  # imports Triton: on first launch only

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


def rose_prune_(count, ema, A, B, n_prune_A, n_prune_B, prune, clamp) -> None:
    """:func:`.torch_backend.rose_prune_` (the contract) in one kernel launch for the layer."""
    some = A if A is not None else B
    dummy = some._replace(param=some.importance, grad=some.importance)  # stands in for an absent factor
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
