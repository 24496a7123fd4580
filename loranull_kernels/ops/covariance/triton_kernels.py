"""Triton kernel of the streaming activation covariance ``C += XᵀX`` (launched by :mod:`.triton_backend`).

Only the tiles of the upper triangle are computed (half the FLOPs of a full ``XᵀX``); each one is written to both
halves, so ``C`` holds the full symmetric sum after every launch. Products accumulate in float32 whatever the input
dtype; fp32 inputs use IEEE fp32 products (TF32 would round the small eigen-directions the null-space methods live in).
"""
import triton
import triton.language as tl


@triton.jit
def covariance_upper_kernel(
    C, X, MASK, TILES,
    T, K,
    stride_xt, stride_xk, stride_cm, stride_cn, stride_mask,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    ti = tl.load(TILES + 2 * pid)
    tj = tl.load(TILES + 2 * pid + 1)
    ri = ti * BLOCK + tl.arange(0, BLOCK)
    rj = tj * BLOCK + tl.arange(0, BLOCK)
    in_i = ri < K
    in_j = rj < K
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        keep = t < T
        t64 = t.to(tl.int64)  # T·K can pass 2³¹ elements for a large calibration batch
        if HAS_MASK:
            keep = keep & (tl.load(MASK + t64 * stride_mask, mask=keep, other=0) != 0)
        # Both operands are masked: a dropped token's values are never loaded, so NaN padding cannot leak in.
        a = tl.load(X + t64[None, :] * stride_xt + ri[:, None] * stride_xk, mask=in_i[:, None] & keep[None, :], other=0.0)
        b = tl.load(X + t64[:, None] * stride_xt + rj[None, :] * stride_xk, mask=keep[:, None] & in_j[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot multiplies bf16 bit patterns: hand it fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    # Only elements with row ≤ col are read and written from this tile; the mirror store fills the lower half, so
    # diagonal tiles come out exactly symmetric even when the dot's rounding is not.
    upper = (ri[:, None] <= rj[None, :]) & in_i[:, None] & in_j[None, :]
    c_ptr = C + ri[:, None].to(tl.int64) * stride_cm + rj[None, :] * stride_cn
    new = tl.load(c_ptr, mask=upper, other=0.0) + acc
    tl.store(c_ptr, new, mask=upper)
    ct_ptr = C + rj[:, None].to(tl.int64) * stride_cm + ri[None, :] * stride_cn
    tl.store(ct_ptr, tl.trans(new), mask=tl.trans(upper))
