"""Seeded dropout for the PyTorch backend, represented by the positions it *drops*.

Why not ``bernoulli_``: on the CPU a dense seeded mask costs about as much as a third of the frozen GEMM it sits
beside (40 ms for 4096 × 1024 fp32 on two cores), and it would be paid twice (forward, then regenerated in
backward). With dropout p ≤ 0.5 the dropped entries are the minority, so this module samples only them, exactly:
the gaps between consecutive dropped positions of an i.i.d. Bernoulli(p) sequence are Geometric(p), drawn by
inversion from ``p · n`` uniforms instead of ``n``. The adapter path is linear in x, so
``drop(x) Aᵀ = (x Aᵀ − S Aᵀ) / (1 − p)`` with ``S`` the sparse matrix of x at the dropped positions: the dense
product is the one the no-dropout path computes anyway, and the correction is a CSR × dense product.

The positions are a pure function of ``(seed, n_rows, n_cols, p, device)``: forward and backward regenerate the
same set, nothing is saved between them. They are not the same positions as the Triton backend's Philox mask.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch


class Dropped(NamedTuple):
    """Dropped entries of an (n_rows, n_cols) matrix in row-major order (sorted)."""

    flat: torch.Tensor  # (nnz,) int64: row * n_cols + col
    rows: torch.Tensor  # (nnz,)
    cols: torch.Tensor  # (nnz,)
    n_rows: int
    n_cols: int


def _uniforms(gens: list[torch.Generator], count: int, device: torch.device) -> torch.Tensor:
    """``count`` uniforms in [0, 1) drawn from every generator and summed modulo 1 (uniform as long as one term is).

    The second stream (the seed's high bits) is read one draw ahead so that swapping the two halves of a seed
    does not give the same sum."""
    u = torch.rand(count, generator=gens[0], device=device)
    if len(gens) > 1:
        v = torch.rand(count + 1, generator=gens[1], device=device)[1:]
        u.add_(v)
        u.sub_(u.floor())  # in [0, 1): the sum is exact on float32's 2⁻²³ grid below 2
    return u


def _generators(seed: int, device: torch.device) -> list[torch.Generator]:
    """Generators for a seed in [0, 2**63): the CPU generator (mt19937) keeps only the low 32 bits of a seed, so
    the high bits seed a second stream; seeds below 2**32 use one stream (the masks they always drew)."""
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    gens = [torch.Generator(device=device)]
    gens[0].manual_seed(lo)
    if hi:
        gens.append(torch.Generator(device=device))
        gens[1].manual_seed(hi)
    return gens


def dropped_entries(seed: int, n_rows: int, n_cols: int, p: float, device: torch.device) -> Dropped:
    """The entries dropped with probability ``p`` each, independently, for the given seed in [0, 2**63) (all its
    bits matter).

    Returns index tensors on ``device`` (int32 when n_rows · n_cols < 2³⁰, else int64).
    """
    n = n_rows * n_cols
    idx_dtype = torch.int32 if n < 2**30 else torch.int64
    gens = _generators(int(seed), device)
    inv_log_keep = 1.0 / math.log1p(-p)
    chunks, start = [], 0
    mean = n * p
    count = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 64)
    while True:
        u = _uniforms(gens, count, device)
        # Geometric(p) on {1, 2, ...} by inversion; the int conversion truncates, i.e. floors (values ≥ 0). A gap
        # past the end is clamped to n + 1 before the conversion (a tiny p draws gaps beyond any integer type),
        # and the running sum is int64 (count · (n + 1) can pass 2³¹).
        gaps = torch.log1p(u.neg_()).mul_(inv_log_keep).clamp_(max=n + 1).to(torch.int64).add_(1)
        pos = torch.cumsum(gaps, 0).add_(start - 1)
        chunks.append(pos)
        last = int(pos[-1])
        if last >= n:  # enough positions drawn (one host sync; the usual case takes one round)
            break
        start = last + 1
        count = max(64, int(2 * (n - start) * p) + 64)
    pos = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    pos = pos[: int(torch.searchsorted(pos, n))]
    small = pos.to(idx_dtype)
    rows = torch.div(small, n_cols, rounding_mode="floor")
    cols = small - rows * n_cols
    # flat indices as int64: gathers (take) and index_fill_ want them, and converting once beats every use
    return Dropped(pos, rows, cols, n_rows, n_cols)


def keep_mask(seed: int, n_rows: int, n_cols: int, p: float, device: torch.device) -> torch.Tensor:
    """The dense bool keep mask (n_rows, n_cols) equivalent to :func:`dropped_entries` (tests and references)."""
    mask = torch.ones(n_rows * n_cols, dtype=torch.bool, device=device)
    mask[dropped_entries(seed, n_rows, n_cols, p, device).flat] = False
    return mask.view(n_rows, n_cols)


def _values(d: Dropped, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    vals = torch.take(x, d.flat) if x.is_contiguous() else x[d.rows, d.cols]
    return vals.to(dtype)


def _csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, col, vals, size=size, check_invariants=False)


def _crow(keys: torch.Tensor, length: int) -> torch.Tensor:
    crow = torch.zeros(length + 1, dtype=keys.dtype, device=keys.device)
    torch.cumsum(torch.bincount(keys, minlength=length), 0, out=crow[1:])
    return crow


def rows_product(d: Dropped, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``S wᵀ`` with S = x restricted to the dropped entries.

    x: (n_rows, n_cols); w: (r, n_cols). Returns (n_rows, r) in w's dtype (use float32/float64 for w: CPU sparse
    kernels do not take half precision).
    """
    vals = _values(d, x, w.dtype)
    S = _csr(_crow(d.rows, d.n_rows), d.cols, vals, (d.n_rows, d.n_cols))
    return S @ w.t()


def cols_product(d: Dropped, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``Sᵀ g`` with S = x restricted to the dropped entries.

    x: (n_rows, n_cols); g: (n_rows, r). Returns (n_cols, r) in g's dtype.
    """
    # Regroup the row-major entries by column: a stable sort on narrow keys (int16 when it fits is ~2× faster).
    keys = d.cols.to(torch.int16) if d.n_cols <= torch.iinfo(torch.int16).max else d.cols
    perm = torch.sort(keys, stable=True).indices
    vals = _values(d, x, g.dtype)[perm]
    St = _csr(_crow(d.cols, d.n_cols), d.rows[perm], vals, (d.n_cols, d.n_rows))
    return St @ g


def zero_dropped_(t: torch.Tensor, d: Dropped) -> torch.Tensor:
    """Set the dropped entries of a contiguous (n_rows, n_cols) tensor to zero, in place."""
    t.view(-1).index_fill_(0, d.flat, 0)
    return t
