"""Triton kernel of RoseLoRA's step: importance EMA, per-line top-k selection, mask, zeroing and clamp in one launch.

A "line" is a row of A (r, in) or a column of B (out, r): the groups within which RoseLoRA keeps its top entries.
One launch covers a layer: programs ``[0, LINES_A)`` take A's rows, the rest B's columns (strided; B is small).

Selection without sorting: importances are ≥ 0, so their float32 bit patterns order like the values; a 31-step
bisection over the bit patterns finds the ``n_prune``-th smallest ``T``; entries below ``T`` are pruned, then the
first of those equal to ``T`` in index order (a second bisection) until exactly ``n_prune`` are: the same choice as a
stable ascending sort (the torch fallback). Portable across Triton 3.6 – 3.9: plain pointers, no dots.

Two paths, chosen per factor by a constexpr:

* short lines (``LONG`` false, ``BLOCK`` ≥ the length): one program holds its line in registers, so each adapter
  entry, its gradient, its importance and its mask are read and written once;
* long lines (``LONG`` true, ``BLOCK`` a chunk shorter than the line): a whole line no longer fits in registers
  without spilling on sm_90 (16384 entries at 32 warps is 64 a thread), so the line is streamed in ``BLOCK``-long
  chunks (the launcher's are half its longest whole line: the last pass holds several values an entry): one pass for the EMA (the new importance is stored), one pass over the stored importance per bisection
  step (a count, from L1/L2: a line is at most a few hundred KiB), and a last pass that writes masks and
  parameters. The ties are cut inside the one chunk where the running count of ties crosses what is still needed.
  Same arithmetic, same choice as the short path.
"""
import triton
import triton.language as tl


@triton.jit
def _update_short(p_ptr, g_ptr, imp_ptr, m_ptr, line, N, s_pl, s_pc, s_gl, s_gc, s_il, s_ic, s_ml, s_mc,
                  beta, n_prune, clamp, PRUNE: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    valid = cols < N
    p = tl.load(p_ptr + line * s_pl + cols * s_pc, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + line * s_gl + cols * s_gc, mask=valid, other=0.0).to(tl.float32)
    imp_old = tl.load(imp_ptr + line * s_il + cols * s_ic, mask=valid, other=0.0)
    imp = imp_old * beta + tl.abs(p * g) * (1.0 - beta)
    tl.store(imp_ptr + line * s_il + cols * s_ic, imp, mask=valid)
    if PRUNE:
        # Padding lanes hold +inf: never counted below mid < +inf, so the loop needs no validity mask (fewer live
        # registers: long lines spilled on sm_90).
        bits = tl.where(valid, imp, float("inf")).to(tl.int32, bitcast=True)
        lo = tl.full((), 0, tl.int32)
        hi = tl.full((), 0x7F800000, tl.int32)  # +inf
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            count = tl.sum((bits <= mid).to(tl.int32), axis=0)
            enough = count >= n_prune
            hi = tl.where(enough, mid, hi)
            lo = tl.where(enough, lo, mid + 1)
        below = (bits < lo) & valid
        ties = (bits == lo) & valid
        # The first `need` ties in index order: the smallest column c with #(ties ≤ c) ≥ need, by a second
        # bisection (a cumsum held a scan's worth of registers and spilled on long lines).
        need = n_prune - tl.sum(below.to(tl.int32), axis=0)
        c_lo = tl.full((), 0, tl.int32)
        c_hi = tl.full((), BLOCK - 1, tl.int32)
        while c_lo < c_hi:
            c_mid = (c_lo + c_hi) // 2
            enough = tl.sum((ties & (cols <= c_mid)).to(tl.int32), axis=0) >= need
            c_hi = tl.where(enough, c_mid, c_hi)
            c_lo = tl.where(enough, c_lo, c_mid + 1)
        pruned = below | (ties & (cols <= c_lo) & (need > 0))
        # The line is read again (from cache) rather than kept in registers through the bisection: long lines
        # spilled on sm_90 otherwise (compile_check --report).
        p_raw = tl.load(p_ptr + line * s_pl + cols * s_pc, mask=valid, other=0.0)
        p = tl.where(pruned, 0.0, p_raw.to(tl.float32))
        if CLAMP:
            p = tl.minimum(tl.maximum(p, -clamp), clamp)
        tl.store(p_ptr + line * s_pl + cols * s_pc, p.to(p_raw.dtype), mask=valid)
        tl.store(m_ptr + line * s_ml + cols * s_mc, (~pruned).to(tl.uint8), mask=valid)


@triton.jit
def _update_long(p_ptr, g_ptr, imp_ptr, m_ptr, line, N, s_pl, s_pc, s_gl, s_gc, s_il, s_ic, s_ml, s_mc,
                 beta, n_prune, clamp, PRUNE: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    p_row, g_row, i_row, m_row = p_ptr + line * s_pl, g_ptr + line * s_gl, imp_ptr + line * s_il, m_ptr + line * s_ml
    for start in range(0, N, BLOCK):
        cols = start + offs
        valid = cols < N
        p = tl.load(p_row + cols * s_pc, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_row + cols * s_gc, mask=valid, other=0.0).to(tl.float32)
        imp_old = tl.load(i_row + cols * s_ic, mask=valid, other=0.0)
        tl.store(i_row + cols * s_ic, imp_old * beta + tl.abs(p * g) * (1.0 - beta), mask=valid)
    if PRUNE:
        # The passes below read back what other threads of the program stored.
        tl.debug_barrier()
        lo = tl.full((), 0, tl.int32)
        hi = tl.full((), 0x7F800000, tl.int32)  # +inf
        n_below = tl.full((), 0, tl.int32)  # #(bits < lo), kept as lo moves: the tie count needs no extra pass
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            count = tl.full((), 0, tl.int32)
            for start in range(0, N, BLOCK):
                cols = start + offs
                # Masked lanes read +inf: never ≤ mid < +inf.
                bits = tl.load(i_row + cols * s_ic, mask=cols < N, other=float("inf")).to(tl.int32, bitcast=True)
                count += tl.sum((bits <= mid).to(tl.int32), axis=0)
            enough = count >= n_prune
            hi = tl.where(enough, mid, hi)
            n_below = tl.where(enough, n_below, count)
            lo = tl.where(enough, lo, mid + 1)
        need = n_prune - n_below  # ties to prune, first in index order
        for start in range(0, N, BLOCK):
            cols = start + offs
            valid = cols < N
            bits = tl.load(i_row + cols * s_ic, mask=valid, other=float("inf")).to(tl.int32, bitcast=True)
            ties = (bits == lo) & valid
            n_ties = tl.sum(ties.to(tl.int32), axis=0)
            # Ties of this chunk up to column `cut` are pruned: all of them while the need lasts, none after it.
            cut = tl.where(need > 0, start + BLOCK - 1, start - 1)
            if (need > 0) & (need < n_ties):
                # The chunk where the need runs out: the smallest c with #(ties ≤ c) ≥ need, by bisection.
                c_lo = start
                c_hi = start + BLOCK - 1
                while c_lo < c_hi:
                    c_mid = (c_lo + c_hi) // 2
                    enough = tl.sum((ties & (cols <= c_mid)).to(tl.int32), axis=0) >= need
                    c_hi = tl.where(enough, c_mid, c_hi)
                    c_lo = tl.where(enough, c_lo, c_mid + 1)
                cut = c_lo
            pruned = (bits < lo) | (ties & (cols <= cut))
            need -= n_ties
            p_raw = tl.load(p_row + cols * s_pc, mask=valid, other=0.0)
            p = tl.where(pruned, 0.0, p_raw.to(tl.float32))
            if CLAMP:
                p = tl.minimum(tl.maximum(p, -clamp), clamp)
            tl.store(p_row + cols * s_pc, p.to(p_raw.dtype), mask=valid)
            tl.store(m_row + cols * s_mc, (~pruned).to(tl.uint8), mask=valid)


@triton.jit
def _line(p_ptr, g_ptr, imp_ptr, m_ptr, line, N, s_pl, s_pc, s_gl, s_gc, s_il, s_ic, s_ml, s_mc,
          beta, n_prune, clamp, PRUNE: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr, LONG: tl.constexpr):
    line = line.to(tl.int64)
    if LONG:
        _update_long(p_ptr, g_ptr, imp_ptr, m_ptr, line, N, s_pl, s_pc, s_gl, s_gc, s_il, s_ic, s_ml, s_mc,
                     beta, n_prune, clamp, PRUNE, CLAMP, BLOCK)
    else:
        _update_short(p_ptr, g_ptr, imp_ptr, m_ptr, line, N, s_pl, s_pc, s_gl, s_gc, s_il, s_ic, s_ml, s_mc,
                      beta, n_prune, clamp, PRUNE, CLAMP, BLOCK)


@triton.jit
def rose_prune_kernel(
    a_ptr, ga_ptr, ia_ptr, ma_ptr, b_ptr, gb_ptr, ib_ptr, mb_ptr, count_ptr,
    LINES_A, N_A, N_B,
    s_a0, s_a1, s_ga0, s_ga1, s_ia0, s_ia1, s_ma0, s_ma1,
    s_b0, s_b1, s_gb0, s_gb1, s_ib0, s_ib1, s_mb0, s_mb1,
    ema, prune_a, prune_b, clamp,
    PRUNE: tl.constexpr, CLAMP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    LONG_A: tl.constexpr, LONG_B: tl.constexpr,
):
    """Programs [0, LINES_A): rows of A (length N_A); the others: columns of B (length N_B). ``count`` holds the
    number of earlier updates: the first one sets Ī = I (decay 0), later ones decay by ``ema``. ``LONG_A``/``LONG_B``:
    that factor's lines are longer than ``BLOCK_A``/``BLOCK_B`` and are streamed in chunks of that size."""
    pid = tl.program_id(0)
    beta = tl.where(tl.load(count_ptr) == 0, 0.0, ema)
    if pid < LINES_A:
        _line(a_ptr, ga_ptr, ia_ptr, ma_ptr, pid, N_A, s_a0, s_a1, s_ga0, s_ga1, s_ia0, s_ia1, s_ma0, s_ma1,
              beta, prune_a, clamp, PRUNE, CLAMP, BLOCK_A, LONG_A)
    else:
        # B's line j is its column j: consecutive entries are a row stride apart.
        _line(b_ptr, gb_ptr, ib_ptr, mb_ptr, pid - LINES_A, N_B, s_b1, s_b0, s_gb1, s_gb0, s_ib1, s_ib0, s_mb1,
              s_mb0, beta, prune_b, clamp, PRUNE, CLAMP, BLOCK_B, LONG_B)
