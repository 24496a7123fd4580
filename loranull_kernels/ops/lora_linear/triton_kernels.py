"""Triton kernels of the fused LoRA linear (the graph split of docs/design.md#the-triton-backend-the-graph-split).

Shapes: x (M, K), W (N, K), A (r, K), B (N, r), d (r,), H (M, r) float32, dG (M, r) float32.
The rank is padded to ``R_PAD`` ≥ 16 (the GPU's ``tl.dot`` minimum) with masked loads, never in memory.

forward   ``lora_down_kernel``      H = drop(x) (A⊙mA)ᵀ                       one skinny pass over x
          ``lora_forward_kernel``   Y = (s·H⊙d)(B⊙mB)ᵀ + x Wᵀ + bias           accumulator starts at the low rank term
backward  ``lora_dy_kernel``        dG = s·dY(B⊙mB),  dB = s·dYᵀ(H⊙d)⊙mB,  Σ dY    one pass over dY
          ``lora_dx_kernel``        dX = ((dG⊙d)(A⊙mA)) ⊙ keep/(1−p) + dY W      accumulator starts at the low rank term
          ``lora_da_kernel``        dAᵀ = (drop(x)ᵀ (dG⊙d)) ⊙ mAᵀ                the one extra read of x, split over M

W is read by ``_w_tile`` in its storage format (constexpr ``W_FORMAT``): dense, bitsandbytes' packed 4-bit nf4 / fp4
(with or without double-quantized block scales) or int8 row-scaled; quantized tiles are dequantized to float32 in
registers and converted to the dot dtype where a dense tile is, inside the Y and dX GEMMs (no dense W exists).

Dropout: ``keep = rand4x(seed, row·⌈K/4⌉ + col/4)[col mod 4] ≥ p`` (Philox, counter = the element's logical
position, four columns a call), identical in the forward and backward kernels, so no mask is ever stored. Masks are applied to the tiles as they are loaded: no
masked copies of A or B exist. Portable across Triton 3.6 – 3.9: plain pointer arithmetic, no block pointers.
"""
import triton
import triton.language as tl


@triton.jit
def _keep(seed, rows, col0, K, p, BLOCK_C: tl.constexpr):
    """Dropout keep mask of the tile rows × [col0, col0 + BLOCK_C) of an (M, K) matrix (col0 a multiple of 4).

    One Philox call gives four uniforms: they serve four consecutive columns (counter = row·⌈K/4⌉ + col/4), a
    quarter of the integer work of one call per element (``tl.rand`` computes four and keeps one)."""
    q = col0 // 4 + tl.arange(0, BLOCK_C // 4)
    offsets = rows[:, None].to(tl.int64) * ((K + 3) // 4) + q[None, :]
    r0, r1, r2, r3 = tl.rand4x(seed, offsets)
    u = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (rows, BLOCK_C/4, 2, 2): column 4q + 2i + j
    return tl.reshape(u, (rows.shape[0], BLOCK_C)) >= p


@triton.jit
def _grouped(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile of an (M, N) output in grouped order, where consecutive programs share the same weight
    tiles in L2: its rows, its columns and its first column."""
    pid, num_m, num_n = tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size = min(num_m - first_m, GROUP_M)
    pid_m, pid_n = first_m + (pid % width) % size, (pid % width) // size
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_n * BLOCK_N


@triton.jit
def _block_scale(block, valid, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                 W_NESTED: tl.constexpr, W_ABSMAX_BLOCK: tl.constexpr):
    """The float32 scale of 4-bit blocks ``block`` (int64, any shape): absmax[b], or with double quantization
    ``absmax_code[absmax[b]] · absmax_scale[b // W_ABSMAX_BLOCK] + absmax_offset``; 0 (offset) where not ``valid``."""
    if W_NESTED:
        q = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
        scale = (tl.load(absmax_code_ptr + q) * tl.load(absmax_scale_ptr + block // W_ABSMAX_BLOCK, mask=valid, other=0.0)
                 + tl.load(absmax_offset_ptr))
    else:
        scale = tl.load(absmax_ptr + block, mask=valid, other=0.0)
    return scale


@triton.jit
def _w_tile(w_ptr, rows, cols, k0, N, K, stride_wn, stride_wk, absmax_ptr, code_ptr, absmax_code_ptr,
            absmax_scale_ptr, absmax_offset_ptr, BLOCK_K: tl.constexpr, W_FORMAT: tl.constexpr,
            W_NESTED: tl.constexpr, W_BLOCK: tl.constexpr, W_ABSMAX_BLOCK: tl.constexpr):
    """The tile ``W[rows, cols]`` of the base W (N, K), read in place in its storage format; ``rows`` / ``cols``
    are the tile's n / k indices, broadcastable against each other ((1, BN) and (BK, 1) give a (BK, BN) tile of Wᵀ),
    ``cols`` = ``k0 + arange(BLOCK_K)``. Offsets are 64-bit where they scale with rows (N·K may exceed 2³¹).

    ``W_FORMAT`` "dense": element (n, k) at ``n·stride_wn + k·stride_wk``, in W's dtype. "4bit" (nf4 / fp4,
    ``quantized_weight.py``; the strides are not read): element e = n·K + k of the row-major matrix is byte e // 2
    of ``w_ptr`` (uint8), its high nibble for even e, decoded through the 16-entry float32 ``code`` and scaled by
    block e // W_BLOCK's scale (:func:`_block_scale`). "int8": ``data[n, k] · (absmax[n] / 127)``, data strided. Quantized tiles come back in float32, which
    the caller converts to the dot dtype where it converts a dense tile. Out-of-bounds elements come back finite, not
    zero (a masked byte decodes to ``code[0]``, times a scale that is zero past row N but may be real past column
    K of a valid row): they meet zeros of the other operand, or are never stored."""
    mask = (cols < K) & (rows < N)
    if W_FORMAT == "4bit":
        # 64-bit arithmetic once per row, 32-bit per element: t counts nibbles from the row's first byte.
        row_start = rows.to(tl.int64) * K
        t = (row_start & 1).to(tl.int32) + cols
        byte = tl.load(w_ptr + (row_start >> 1) + (t >> 1), mask=mask, other=0)
        nibble = tl.where((t & 1) == 0, byte >> 4, byte & 15).to(tl.int32)
        # The codebook lookup as a register gather (warp shuffles): a gather from memory would be staged in shared
        # memory by the pipeliner, a float32 tile per stage (the kernels then spilled or overflowed it).
        value = tl.gather(tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[:, None], (16, nibble.shape[1])),
                          nibble, 0)
        # A tile row of BLOCK_K elements spans at most (BLOCK_K - 1) // W_BLOCK + 2 blocks (blocks straddle rows, so
        # not one even when W_BLOCK ≥ BLOCK_K): their scales are loaded once per row and selected per element, not
        # gathered per element (the pipeliner would stage such gathers in shared memory, a float32 tile per
        # stage). bitsandbytes' block sizes (≥ 32) give at most 5 at BLOCK_K = 128; tiny blocks cost more selects.
        first = (row_start + k0) // W_BLOCK
        j = (((row_start + k0) % W_BLOCK).to(tl.int32) + cols - k0) // W_BLOCK  # block - first, per element
        scale = tl.zeros(value.shape, tl.float32)
        for i in tl.static_range((BLOCK_K - 1) // W_BLOCK + 2):
            # A block that starts past its row's end serves none of the row's elements (and may lie past the
            # last block): not read.
            s_i = _block_scale(first + i, (rows < N) & ((first + i) * W_BLOCK < row_start + K), absmax_ptr,
                               absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, W_NESTED, W_ABSMAX_BLOCK)
            scale = tl.where(j == i, s_i, scale)
        w = value * scale
    elif W_FORMAT == "int8":
        # absmax / 127 first, then the product: the rounding of QuantizedWeight.dequantize (the torch backend).
        row_scale = tl.load(absmax_ptr + rows, mask=rows < N, other=0.0) / 127.0
        w = tl.load(w_ptr + rows.to(tl.int64) * stride_wn + cols * stride_wk, mask=mask, other=0)
        w = w.to(tl.float32) * row_scale
    else:
        tl.static_assert(W_FORMAT == "dense", "W_FORMAT is one of 'dense', '4bit', 'int8'")
        w = tl.load(w_ptr + rows.to(tl.int64) * stride_wn + cols * stride_wk, mask=mask, other=0.0)
    return w


@triton.jit
def _low_rank_tile(g_ptr, stride_gm, rm, M, d_ptr, stride_d, scale, f_ptr, mf_ptr, rc, C, stride_fc, stride_fr,
                   stride_mfc, stride_mfr, R, HAS_RANK_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                   R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """``(G⊙d·scale)(F⊙mF)ᵀ`` on the tile rows ``rm`` × columns ``rc``, float32, where the forward's and dX's
    accumulators start: G (M, R) float32 with unit column stride (H, or dG), F (C, R) the factor read as
    ``F[c, r] = f_ptr[c·stride_fc + r·stride_fr]`` (B, or Aᵀ) and its bool mask mF alike."""
    rr = tl.arange(0, R_PAD)
    g = tl.load(g_ptr + rm[:, None] * stride_gm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    if HAS_RANK_SCALE:
        g = g * (tl.load(d_ptr + rr * stride_d, mask=rr < R, other=0.0).to(tl.float32) * scale)[None, :]
    else:
        g = g * scale
    f_mask = (rr[:, None] < R) & (rc[None, :] < C)
    f = tl.load(f_ptr + rc[None, :] * stride_fc + rr[:, None] * stride_fr, mask=f_mask, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mf_ptr + rc[None, :] * stride_mfc + rr[:, None] * stride_mfr, mask=f_mask, other=0)
        f = tl.where(keep != 0, f, 0.0)
    return tl.dot(g, f, input_precision=PRECISION)


@triton.jit(do_not_specialize=["seed"])
def lora_down_kernel(
    x_ptr, a_ptr, ma_ptr, h_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_mar, stride_mak, stride_hm,
    seed, p, keep_scale,
    HAS_MASK_A: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep(seed, rm, k0, K, p, BLOCK_K), xt, 0.0)
        a_mask = (rk[:, None] < K) & (rr[None, :] < R)
        at = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak, mask=a_mask, other=0.0)
        if HAS_MASK_A:
            keep_a = tl.load(ma_ptr + rr[None, :] * stride_mar + rk[:, None] * stride_mak, mask=a_mask, other=0)
            at = tl.where(keep_a != 0, at, 0.0)
        acc += tl.dot(xt.to(DOT_DTYPE), at.to(DOT_DTYPE), input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :], acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def lora_forward_kernel(
    x_ptr, w_ptr, h_ptr, b_ptr, mb_ptr, d_ptr, bias_ptr, y_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_bn, stride_br, stride_mbn, stride_mbr,
    stride_d, stride_bias, stride_ym, stride_yn,
    w_absmax_ptr, w_code_ptr, w_absmax_code_ptr, w_absmax_scale_ptr, w_absmax_offset_ptr,
    HAS_MASK_B: tl.constexpr, HAS_RANK_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    W_FORMAT: tl.constexpr, W_NESTED: tl.constexpr, W_BLOCK: tl.constexpr, W_ABSMAX_BLOCK: tl.constexpr,
):
    rm, rn, _ = _grouped(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Accumulator starts at the low-rank product (s·H⊙d)(B⊙mB)ᵀ: Y is written exactly once.
    acc = _low_rank_tile(h_ptr, stride_hm, rm, M, d_ptr, stride_d, scaling, b_ptr, mb_ptr, rn, N, stride_bn, stride_br,
                         stride_mbn, stride_mbr, R, HAS_RANK_SCALE, HAS_MASK_B, R_PAD, PRECISION)

    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                     mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wt = _w_tile(w_ptr, rn[None, :], rk[:, None], k0, N, K, stride_wn, stride_wk, w_absmax_ptr, w_code_ptr,
                     w_absmax_code_ptr, w_absmax_scale_ptr, w_absmax_offset_ptr, BLOCK_K, W_FORMAT, W_NESTED,
                     W_BLOCK, W_ABSMAX_BLOCK)
        acc += tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def lora_dy_kernel(
    dy_ptr, b_ptr, mb_ptr, h_ptr, d_ptr, dg_ptr, db_ptr, dbias_ptr,
    M, N, R, scaling,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_mbn, stride_mbr, stride_hm, stride_hr, stride_d, stride_dgm,
    stride_dbp, stride_dbiasp,
    HAS_MASK_B: tl.constexpr, HAS_RANK_SCALE: tl.constexpr, NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One pass over dY. Row-block programs; dB and Σ dY are reduced across them either with fp32 atomics
    (ATOMIC) or, when torch's deterministic mode is on, into per-program slabs summed afterwards."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    row_ok = rm < M
    if NEED_DB:
        hd = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr, mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        if HAS_RANK_SCALE:
            hd = hd * (tl.load(d_ptr + rr * stride_d, mask=rr < R, other=0.0).to(tl.float32) * scaling)[None, :]
        else:
            hd = hd * scaling
        hd = hd.to(DOT_DTYPE)
    dg = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        col_ok = rn < N
        dyt = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :] * stride_dyn,
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b_mask = col_ok[:, None] & (rr[None, :] < R)
        bt = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=b_mask, other=0.0)
        if HAS_MASK_B:
            keep_b = tl.load(mb_ptr + rn[:, None] * stride_mbn + rr[None, :] * stride_mbr, mask=b_mask, other=0)
            bt = tl.where(keep_b != 0, bt, 0.0)
        dyd = dyt.to(DOT_DTYPE)
        dg += tl.dot(dyd, bt.to(DOT_DTYPE), input_precision=PRECISION)
        if NEED_DB:
            part = tl.dot(tl.trans(dyd), hd, input_precision=PRECISION)  # (BLOCK_N, R_PAD)
            if HAS_MASK_B:
                part = tl.where(keep_b != 0, part, 0.0)
            db_ptrs = db_ptr + rn[:, None] * R_PAD + rr[None, :]
            if ATOMIC:
                tl.atomic_add(db_ptrs, part, mask=b_mask)
            else:
                tl.store(db_ptrs + pid * stride_dbp, part, mask=b_mask)
        if NEED_DBIAS:
            colsum = tl.sum(dyt.to(tl.float32), axis=0)
            if ATOMIC:
                tl.atomic_add(dbias_ptr + rn, colsum, mask=col_ok)
            else:
                tl.store(dbias_ptr + pid * stride_dbiasp + rn, colsum, mask=col_ok)
    tl.store(dg_ptr + rm[:, None] * stride_dgm + rr[None, :], dg * scaling, mask=row_ok[:, None] & (rr[None, :] < R))


@triton.jit(do_not_specialize=["seed"])
def lora_dx_kernel(
    dy_ptr, w_ptr, dg_ptr, d_ptr, a_ptr, ma_ptr, dx_ptr,
    M, N, K, R, seed, p, keep_scale,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dgm, stride_d, stride_ar, stride_ak, stride_mar, stride_mak,
    stride_dxm, stride_dxk,
    w_absmax_ptr, w_code_ptr, w_absmax_code_ptr, w_absmax_scale_ptr, w_absmax_offset_ptr,
    HAS_MASK_A: tl.constexpr, HAS_RANK_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    W_FORMAT: tl.constexpr, W_NESTED: tl.constexpr, W_BLOCK: tl.constexpr, W_ABSMAX_BLOCK: tl.constexpr,
):
    rm, rk, k0 = _grouped(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    # Accumulator starts at the adapter's input gradient ((dG⊙d)(A⊙mA)) ⊙ keep/(1−p); Aᵀ is the factor (K, R).
    acc = _low_rank_tile(dg_ptr, stride_dgm, rm, M, d_ptr, stride_d, 1.0, a_ptr, ma_ptr, rk, K, stride_ak, stride_ar,
                         stride_mak, stride_mar, R, HAS_RANK_SCALE, HAS_MASK_A, R_PAD, PRECISION)
    if HAS_DROPOUT:
        acc = tl.where(_keep(seed, rm, k0, K, p, BLOCK_K), acc * keep_scale, 0.0)

    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dyt = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :] * stride_dyn,
                      mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        wt = _w_tile(w_ptr, rn[:, None], rk[None, :], k0, N, K, stride_wn, stride_wk, w_absmax_ptr, w_code_ptr,
                     w_absmax_code_ptr, w_absmax_scale_ptr, w_absmax_offset_ptr, BLOCK_K, W_FORMAT, W_NESTED,
                     W_BLOCK, W_ABSMAX_BLOCK)
        acc += tl.dot(dyt.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PRECISION)

    tl.store(dx_ptr + rm[:, None].to(tl.int64) * stride_dxm + rk[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit(do_not_specialize=["seed"])
def lora_da_kernel(
    x_ptr, dg_ptr, d_ptr, ma_ptr, da_ptr,
    M, K, R, rows_per_split, seed, p, keep_scale,
    stride_xm, stride_xk, stride_dgm, stride_d, stride_mar, stride_mak, stride_dap,
    HAS_MASK_A: tl.constexpr, HAS_RANK_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (k-block, split) reduces rows [split·rows_per_split, …) into slab ``split`` of dAᵀ (K, R), fp32;
    the slabs are summed afterwards (deterministic, unlike atomics). dAᵀ = drop(x)ᵀ(dG⊙d) rather than dA: the MMA's
    M dimension is then BLOCK_K (≥ 64, warp-group MMA on sm_90) instead of the rank (16 or 32: mma.sync only)."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    if HAS_RANK_SCALE:
        d = tl.load(d_ptr + rr * stride_d, mask=rr < R, other=0.0).to(tl.float32)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < m_end
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                     mask=row_ok[:, None] & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep(seed, rm, pid_k * BLOCK_K, K, p, BLOCK_K), xt, 0.0)
        dh = tl.load(dg_ptr + rm[:, None] * stride_dgm + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        if HAS_RANK_SCALE:
            dh = dh * d[None, :]
        acc += tl.dot(tl.trans(xt.to(DOT_DTYPE)), dh.to(DOT_DTYPE), input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    a_mask = (rk[:, None] < K) & (rr[None, :] < R)
    if HAS_MASK_A:
        keep_a = tl.load(ma_ptr + rr[None, :] * stride_mar + rk[:, None] * stride_mak, mask=a_mask, other=0)
        acc = tl.where(keep_a != 0, acc, 0.0)
    tl.store(da_ptr + split * stride_dap + rk[:, None] * R + rr[None, :], acc, mask=a_mask)


@triton.jit(do_not_specialize=["seed"])
def keep_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialise the dropout keep mask the kernels above use (tests and debugging only)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(seed, rm, tl.program_id(1) * BLOCK_K, K, p, BLOCK_K)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], keep.to(tl.int8),
             mask=(rm[:, None] < M) & (rk[None, :] < K))
