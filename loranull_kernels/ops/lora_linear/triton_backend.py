"""The Triton backend of ``lora_linear``: launches the kernels of :mod:`.triton_kernels` with the per-GPU
configurations of :mod:`.triton_configs`.

Triton is imported on first use only, so the package imports (and the torch backend runs) where Triton cannot.
``forward`` / ``backward`` implement the contract of :mod:`.autograd` (the custom ops). A quantized base
(:class:`.quantized_weight.QuantizedWeight`, nf4 / fp4 / int8) is passed to the kernels as it is stored
(:func:`_weight_args`): they dequantize its tiles inside the Y and dX GEMMs, and no dense copy of W is made.
"""
import functools
from typing import Optional

import torch

from ... import backend
from . import torch_backend
from .quantized_weight import QuantizedWeight


@functools.lru_cache(maxsize=None)
def _triton():
    import triton
    import triton.language as tl

    from . import triton_configs as configs, triton_kernels as kernels

    return triton, tl, kernels, configs


def _r_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _dot_dtype(dtype: torch.dtype):
    _, tl, _, _ = _triton()
    if dtype == torch.bfloat16 and backend.interpreting():
        return tl.float32  # the interpreter's tl.dot on bf16 multiplies bit patterns (docs/design.md)
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's own matmul precision setting (torch defaults to exact fp32, not TF32). The
    # rank-r products run on fp32 operands for half-precision inputs too, where TF32 is more than enough.
    if backend.interpreting():
        return "ieee"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch_kw(cfg: dict) -> dict:
    return {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}


def _mask_args(mask: Optional[torch.Tensor], fallback: torch.Tensor):
    # bool tensors are read as bytes; a dummy pointer (never dereferenced) stands in for an absent mask.
    if mask is None:
        return fallback, 0, 0
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def _stride0(v: Optional[torch.Tensor]) -> int:
    # Vectors (rank_scale, bias) may be strided views or expanded (stride 0); absent ones are never read.
    return 0 if v is None else v.stride(0)


def _weight_args(weight) -> tuple[list, list, dict]:
    """W as the Y / dX kernels read it: ``[w_ptr, stride_wn, stride_wk]``, ``[absmax, code, absmax_code,
    absmax_scale, absmax_offset]`` pointers, and the constexprs of ``triton_kernels._w_tile``.

    Dense (N, K): its strides, no tables. nf4 / fp4: the ⌈N·K/2⌉ packed bytes, row-major by definition (the
    strides passed, (K, 1), are not read). int8: the (N, K) codes with their own strides and the row scales.
    Tables a format does not have are filled by ``data``, never read."""
    if not isinstance(weight, QuantizedWeight):
        return [weight, weight.stride(0), weight.stride(1)], [weight] * 5, dict(
            W_FORMAT="dense", W_NESTED=False, W_BLOCK=1, W_ABSMAX_BLOCK=1)
    data = weight.data
    if weight.format == "int8":
        return [data, data.stride(0), data.stride(1)], [weight.absmax] + [data] * 4, dict(
            W_FORMAT="int8", W_NESTED=False, W_BLOCK=1, W_ABSMAX_BLOCK=1)
    tables = [weight.absmax, weight.code]
    tables += [weight.absmax_code, weight.absmax_scale, weight.absmax_offset] if weight.nested else [data] * 3
    # The block sizes are constexprs: e // blocksize becomes a shift (bitsandbytes' sizes are powers of two)
    # instead of a 64-bit division per element, at one compilation per block size.
    return [data, weight.in_features, 1], tables, dict(
        W_FORMAT="4bit", W_NESTED=weight.nested, W_BLOCK=weight.blocksize,
        W_ABSMAX_BLOCK=weight.absmax_blocksize if weight.nested else 1)


def forward(x, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling, dropout_p):
    """:func:`.autograd.forward_op` (the contract) on this backend; H is float32."""
    if x.shape[0] == 0:
        return torch_backend.forward(x, weight, lora_A, lora_B, rank_scale, bias, mask_A, mask_B, seed, scaling, dropout_p)
    triton, _, kernels, configs = _triton()
    (M, K), N, r = x.shape, weight.shape[0], lora_A.shape[0]
    R_PAD, dot_dtype, precision = _r_pad(r), _dot_dtype(x.dtype), _precision(x.dtype)
    has_dropout = dropout_p > 0
    seed_v = int(seed) if has_dropout else 0
    keep_scale = 1.0 / (1.0 - dropout_p)

    h = backend.empty(M, r, dtype=torch.float32, device=x.device)
    ma, s_mar, s_mak = _mask_args(mask_A, lora_A)
    cfg = configs.config("down", x.device, x.dtype, has_dropout)
    launch = _launch_kw(cfg)
    kernels.lora_down_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x, lora_A, ma, h, M, K, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s_mar, s_mak, h.stride(0),
        seed_v, dropout_p, keep_scale,
        HAS_MASK_A=mask_A is not None, HAS_DROPOUT=has_dropout, R_PAD=R_PAD,
        DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg, **launch,
    )

    y = backend.empty(M, N, dtype=x.dtype, device=x.device)
    mb, s_mbn, s_mbr = _mask_args(mask_B, lora_B)
    (w, stride_wn, stride_wk), w_tables, w_format = _weight_args(weight)
    cfg = configs.config("forward", x.device, x.dtype, quantized=w_format["W_FORMAT"] != "dense")
    launch = _launch_kw(cfg)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    kernels.lora_forward_kernel[grid](
        x, w, h, lora_B, mb, h if rank_scale is None else rank_scale, h if bias is None else bias, y,
        M, N, K, r, scaling,
        x.stride(0), x.stride(1), stride_wn, stride_wk, h.stride(0), lora_B.stride(0), lora_B.stride(1),
        s_mbn, s_mbr, _stride0(rank_scale), _stride0(bias), y.stride(0), y.stride(1), *w_tables,
        HAS_MASK_B=mask_B is not None, HAS_RANK_SCALE=rank_scale is not None, HAS_BIAS=bias is not None,
        R_PAD=R_PAD, DOT_DTYPE=dot_dtype, PRECISION=precision, **w_format, **cfg, **launch,
    )
    return y, h


def backward(dy, x, weight, lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed, scaling, dropout_p,
             need_dx, need_dA, need_dB, need_drank_scale, need_dbias):
    """:func:`.autograd.backward_op` (the contract) on this backend."""
    if dy.shape[0] == 0:
        return torch_backend.backward(dy, x, weight, lora_A, lora_B, rank_scale, h, mask_A, mask_B, seed, scaling,
                                      dropout_p, need_dx, need_dA, need_dB, need_drank_scale, need_dbias)
    triton, _, kernels, configs = _triton()
    (M, N), K, r = dy.shape, weight.shape[1], lora_A.shape[0]
    dev = dy.device
    R_PAD, dot_dtype, precision = _r_pad(r), _dot_dtype(dy.dtype), _precision(dy.dtype)
    has_dropout = dropout_p > 0
    seed_v = int(seed) if has_dropout else 0
    keep_scale = 1.0 / (1.0 - dropout_p)
    ma, s_mar, s_mak = _mask_args(mask_A, lora_A)
    mb, s_mbn, s_mbr = _mask_args(mask_B, lora_B)
    d_arg = h if rank_scale is None else rank_scale

    # --- one pass over dY: dG = s·dY B, and (if asked) dB and Σ dY ------------------------------------------
    cfg = configs.config("dy", dev, dy.dtype)
    launch = _launch_kw(cfg)
    programs = triton.cdiv(M, cfg["BLOCK_M"])
    atomic = not torch.are_deterministic_algorithms_enabled()
    slabs = 1 if atomic else programs
    dg = backend.empty(M, r, dtype=torch.float32, device=dev)
    alloc = torch.zeros if atomic else (lambda *s, **kw: backend.empty(*s, **kw))
    db_acc = alloc(slabs, N, R_PAD, dtype=torch.float32, device=dev) if need_dB else dg
    dbias_acc = alloc(slabs, N, dtype=torch.float32, device=dev) if need_dbias else dg
    kernels.lora_dy_kernel[(programs,)](
        dy, lora_B, mb, h, d_arg, dg, db_acc, dbias_acc,
        M, N, r, scaling,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s_mbn, s_mbr, h.stride(0), h.stride(1),
        _stride0(rank_scale), dg.stride(0),
        N * R_PAD, N,
        HAS_MASK_B=mask_B is not None, HAS_RANK_SCALE=rank_scale is not None, NEED_DB=need_dB,
        NEED_DBIAS=need_dbias, ATOMIC=atomic, R_PAD=R_PAD, DOT_DTYPE=dot_dtype, PRECISION=precision,
        **cfg, **launch,
    )
    dB = db_acc.sum(0)[:, :r].contiguous().to(lora_B.dtype) if need_dB else dy.new_empty(0)
    dbias = dbias_acc.sum(0).to(dy.dtype) if need_dbias else dy.new_empty(0)
    dd = (dg * h).sum(0).to(rank_scale.dtype) if need_drank_scale else dy.new_empty(0)

    dx = dy.new_empty(0)
    if need_dx:
        dx = backend.empty(M, K, dtype=dy.dtype, device=dev)
        (w, stride_wn, stride_wk), w_tables, w_format = _weight_args(weight)
        cfg = configs.config("dx", dev, dy.dtype, has_dropout, quantized=w_format["W_FORMAT"] != "dense")
        launch = _launch_kw(cfg)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
        kernels.lora_dx_kernel[grid](
            dy, w, dg, d_arg, lora_A, ma, dx,
            M, N, K, r, seed_v, dropout_p, keep_scale,
            dy.stride(0), dy.stride(1), stride_wn, stride_wk, dg.stride(0), _stride0(rank_scale),
            lora_A.stride(0), lora_A.stride(1), s_mar, s_mak, dx.stride(0), dx.stride(1), *w_tables,
            HAS_MASK_A=mask_A is not None, HAS_RANK_SCALE=rank_scale is not None, HAS_DROPOUT=has_dropout,
            R_PAD=R_PAD, DOT_DTYPE=dot_dtype, PRECISION=precision, **w_format, **cfg, **launch,
        )

    dA = dy.new_empty(0)
    if need_dA:
        cfg = configs.config("da", dev, dy.dtype, has_dropout)
        launch = _launch_kw(cfg)
        block_m, block_k = cfg["BLOCK_M"], cfg["BLOCK_K"]
        k_blocks, m_blocks = triton.cdiv(K, block_k), triton.cdiv(M, block_m)
        split = cfg.pop("SPLIT_M")
        if split == "auto":  # enough programs for about two waves on the GPU
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            split = max(1, min(m_blocks, (2 * sms) // k_blocks))
        split = max(1, min(int(split), m_blocks))
        rows_per_split = triton.cdiv(m_blocks, split) * block_m
        split = triton.cdiv(M, rows_per_split)
        da_acc = backend.empty(split, K, r, dtype=torch.float32, device=dev)  # slabs of dAᵀ
        kernels.lora_da_kernel[(k_blocks, split)](
            x, dg, d_arg, ma, da_acc,
            M, K, r, rows_per_split, seed_v, dropout_p, keep_scale,
            x.stride(0), x.stride(1), dg.stride(0), _stride0(rank_scale), s_mar, s_mak, r * K,
            HAS_MASK_A=mask_A is not None, HAS_RANK_SCALE=rank_scale is not None, HAS_DROPOUT=has_dropout,
            R_PAD=R_PAD, DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg, **launch,
        )
        dA = (da_acc[0] if split == 1 else da_acc.sum(0)).t().to(lora_A.dtype).contiguous()
    return dx, dA, dB, dd, dbias


def keep_mask(seed: int, n_rows: int, n_cols: int, p: float, device: torch.device) -> torch.Tensor:
    """The dense bool keep mask these kernels draw for ``seed`` (tests and debugging)."""
    triton, _, kernels, _ = _triton()
    out = torch.empty(n_rows, n_cols, dtype=torch.int8, device=device)
    block = 32
    kernels.keep_mask_kernel[(triton.cdiv(n_rows, block), triton.cdiv(n_cols, block))](
        out, n_rows, n_cols, seed, p, BLOCK_M=block, BLOCK_K=block)
    return out.bool()
