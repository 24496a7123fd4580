"""Launch configurations of the lora_linear kernels, per GPU.

A table per device (matched by a substring of ``torch.cuda.get_device_name()``), one entry per kernel. There is
deliberately no multi-config ``@triton.autotune``: autotuning at import or first call costs seconds per shape, is
not reproducible, and crashes under the interpreter. Tables are filled from measurements (benchmarks/NOTES.md);
``default`` holds conventional Hopper/Ampere GEMM tilings that have NOT been tuned yet (no GPU in the session that
wrote them), and ``interpreter`` small tiles that keep Triton's CPU interpreter fast on test shapes.

Keys: ``down`` (H = drop(x)Aᵀ), ``forward`` (the Y GEMM), ``dy`` (dG / dB / Σ dY), ``dx`` (the dX GEMM),
``da`` (dA; ``SPLIT_M`` = "auto" spreads the M reduction over enough programs to fill the GPU); variants
``kernel:fp32``, ``kernel:dropout`` and, for a quantized base read in the tiles, ``kernel:quant[:fp32|:dropout]``
(:func:`lookup`).
"""
from __future__ import annotations

import functools

import torch

from ...backend import interpreting

_INTERPRETER = {
    "down": dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1),
    "forward": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1),
    "dy": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    "dx": dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, GROUP_M=4, num_warps=4, num_stages=1),
    "da": dict(BLOCK_M=32, BLOCK_K=32, SPLIT_M=2, num_warps=4, num_stages=1),
}

_DEFAULT = {
    "down": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
    "forward": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "dy": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "dx": dict(BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP_M=8, num_warps=8, num_stages=3),
    "da": dict(BLOCK_M=64, BLOCK_K=128, SPLIT_M="auto", num_warps=8, num_stages=3),
    # Variants (``kernel:variant``), chosen by ``lookup``; each one removes a spill ptxas reported for sm_90
    # (``compile_check --report``). IEEE fp32 dots run on FMA units with both operands in registers: smaller K steps / tiles.
    "forward:fp32": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    "dy:fp32": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3),
    "dx:fp32": dict(BLOCK_M=128, BLOCK_K=64, BLOCK_N=32, GROUP_M=8, num_warps=8, num_stages=3),
    # Quantized bases (W dequantized in the tiles, ``kernel:quant``), likewise from the sm_90 report. The forward's
    # tile fits at the reference shape but spilled 8-256 B where K is not a multiple of 16 (no vector loads: every
    # byte and code its own load); the dX tile spilled 8-16 B with an nf4 base at rank 64. Half the K (forward) or
    # N (dX) step halves the elements each thread dequantizes per step (forward: one more stage keeps as much of x
    # in flight). IEEE fp32 at the dense fp32 tiles spilled 0.4-7 KB (the dequantized operand is converted to the
    # FMA dot's layout on top of both operands in registers): the largest tiles tried with a margin (≤ 190 regs).
    "forward:quant": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
    "dx:quant": dict(BLOCK_M=128, BLOCK_K=128, BLOCK_N=32, GROUP_M=8, num_warps=8, num_stages=3),
    "forward:quant:fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
    "dx:quant:fp32": dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=16, GROUP_M=8, num_warps=8, num_stages=3),
}

# Per-device tables, most specific name first. Add an entry only with measurements behind it.
TABLES: dict[str, dict[str, dict]] = {
    "default": _DEFAULT,
}


@functools.lru_cache(maxsize=None)
def _table_for(device_name: str) -> dict[str, dict]:
    for key, table in TABLES.items():
        if key != "default" and key.lower() in device_name.lower():
            return table
    return TABLES["default"]


def lookup(table: dict, kernel: str, dtype: torch.dtype | None = None, dropout: bool = False,
           quantized: bool = False) -> dict:
    """``table``'s entry for ``kernel``: ``kernel:fp32`` for float32 inputs, else ``kernel:dropout`` with dropout,
    when the table has one, else ``kernel``; with a quantized base, each of these is preceded by its ``:quant``
    twin (``kernel:quant:fp32``, ``kernel:quant:dropout``, ``kernel:quant``). A fresh dict the caller may edit."""
    keys = ([f"{kernel}:fp32"] if dtype == torch.float32 else []) + ([f"{kernel}:dropout"] if dropout else [])
    keys.append(kernel)
    if quantized:
        keys = [q for k in keys for q in (k.replace(kernel, f"{kernel}:quant", 1), k)]
    return dict(next(table[k] for k in keys if k in table))


def config(kernel: str, device: torch.device, dtype: torch.dtype | None = None, dropout: bool = False,
           quantized: bool = False) -> dict:
    """The launch configuration of ``kernel`` for ``dtype`` inputs on ``device`` (a fresh dict the caller may edit).

    Keys of ``kernel``: "down", "forward", "dy", "dx", "da"; ``dropout``: whether the launch draws a dropout mask;
    ``quantized``: whether W is read packed (nf4 / fp4 / int8) and dequantized in the tiles.
    """
    if device.type != "cuda" or interpreting():
        return dict(_INTERPRETER[kernel])
    return lookup(_table_for(torch.cuda.get_device_name(device)), kernel, dtype, dropout, quantized)
