"""Compile every Triton kernel of the package for a GPU architecture without a GPU (ahead of time, to cubin).

Triton's interpreter, which runs the kernel tests on CPU, accepts programs the GPU compiler rejects (``tl.dot``
shapes, dtype mixes, loop-carried scalar types, shared memory beyond the SM's), so CI, which has no GPU, runs::

    python -m loranull_kernels.triton.compile_check --arch 90 --report

Each kernel is compiled as a GPU launch would compile it: the lora_linear kernels' arguments are recorded from the
launcher itself (``ops/lora_linear/triton_backend.py``) run on meta tensors at the reference shape, with the GPU
config tables, then specialised by Triton's JIT rules (an integer equal to 1 becomes a constant, multiples of 16 and
pointers are marked 16-divisible): a unit stride the launcher passes is what lets the compiler vectorise loads and
pipeline them with ``cp.async``. bf16/fp16/fp32 inputs, optional features on and off; every kernel must fit the SM's
shared memory.

``--report`` adds, per kernel, what ptxas made of it (registers, spill stack, local loads/stores, shared memory,
tensor-core instruction family and count, async copies) beside a plain Triton GEMM of the same tile, and fails on a
spill in any kernel launched with a GPU table's config and on a bf16/fp16 kernel whose dots got no tensor-core
instruction. Run it with ``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction``s). A GPU session can
also use it to check another Triton version before running anything.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import sys
import time
from typing import Optional

SMEM_BYTES = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100/H200)
REFERENCE_SHAPE = dict(M=8192, K=4096, N=4096)  # the benchmark's reference layer (docs/performance.md)
# (input dtype, adapter dtype, optional features on, rank): bf16/fp16 adapters, and fp32 adapters beside bf16 (PEFT).
LORA_VARIANTS = [("bf16", "bf16", True, 16), ("bf16", "fp32", False, 64), ("fp16", "fp16", True, 32),
                 ("fp32", "fp32", True, 16), ("fp32", "fp32", False, 16)]
# Quantized bases (ops/lora_linear/quantized_weight.py) read in place by the Y and dX kernels, each with every
# LORA_VARIANTS entry: bitsandbytes' defaults (blocksize 64; nested: 256 block scales per absmax scale). fp4 is nf4
# with another codebook: the same kernels.
QUANTIZED_BASES = ("nf4", "nf4-nested", "int8")
QUANTIZED_KERNELS = ("lora_forward_kernel", "lora_dx_kernel")  # the others never read W
# Quantized tiles at a shape whose K and N are multiples of no vector width (every byte of W its own load): where
# the forward's default tile spilled, hence its ``forward:quant`` variant.
UNALIGNED_SHAPE = dict(M=8192, K=4097, N=4100)
UNALIGNED_VARIANTS = [("bf16", "bf16", True, 16), ("bf16", "fp32", False, 64), ("fp32", "fp32", True, 16)]
_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "uint8": "*u8", "int8": "*i8",
        "int32": "*i32", "int64": "*i64"}


@dataclasses.dataclass
class Case:
    """One kernel compilation. ``table``: the config table its launch configuration came from (None: a fixed launch
    shape of the dispatch code); ``tile``: the (m, n, k) GEMM its main loop is; ``dot_dtype``: its dot operands'."""

    label: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    table: Optional[str] = None
    tile: Optional[tuple] = None
    dot_dtype: Optional[str] = None


def specialize(fn, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``fn`` launched with ``args`` (non-constexpr parameters by name: tensors,
    ints, floats) by the rules of Triton's JIT: pointers and integers that are multiples of 16 get
    ``tt.divisibility = 16``, integers equal to 1 become constants, except for ``do_not_specialize`` parameters."""
    import torch

    sig, cx, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            cx[p.name] = constexprs[p.name]
            continue
        v = args[p.name]
        if isinstance(v, torch.Tensor):
            sig[p.name] = _PTR[str(v.dtype).replace("torch.", "")]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif isinstance(v, int):
            sig[p.name] = "i64" if not -2**31 <= v < 2**31 else "i32"
            if p.do_not_specialize:
                sig[p.name] = "i64" if p.name == "seed" else sig[p.name]  # seeds take all 63 bits
            elif v == 1:
                sig[p.name], cx[p.name] = "constexpr", 1
            elif v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {p.name}={v!r}")
    return sig, cx, attrs


class _Recorder:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            params = [p for p in self.fn.params if not p.is_constexpr]
            self.log.append((self.fn, dict(zip([p.name for p in params], args)), kwargs))
        return launch


class _Configs:
    """Stands in for ``ops/lora_linear/triton_configs.py`` on meta tensors: every kernel gets ``table``'s entry."""

    def __init__(self, table: dict):
        self.table = table

    def config(self, kernel, device, dtype=None, dropout=False, quantized=False):
        from ..ops.lora_linear.triton_configs import lookup

        cfg = lookup(self.table, kernel, dtype, dropout, quantized)
        if cfg.get("SPLIT_M") == "auto":  # what "auto" gives on a 132-SM H100 at the reference shape
            cfg["SPLIT_M"] = max(1, (2 * 132) // -(-REFERENCE_SHAPE["K"] // cfg["BLOCK_K"]))
        return cfg


def meta_weight(base: str, N: int, K: int, dtype):
    """The (N, K) base on meta tensors: dense ``dtype``, or a ``QuantizedWeight`` ("nf4", "nf4-nested", "int8")
    laid out as bitsandbytes lays it out."""
    import math

    import torch

    from ..ops.lora_linear.quantized_weight import QuantizedWeight

    meta = dict(device="meta")
    if base == "dense":
        return torch.empty(N, K, dtype=dtype, **meta)
    if base == "int8":
        return QuantizedWeight("int8", torch.empty(N, K, dtype=torch.int8, **meta), (N, K),
                               absmax=torch.empty(N, **meta))
    n, blocksize, absmax_blocksize = N * K, 64, 256
    blocks = math.ceil(n / blocksize)
    data, code = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, **meta), torch.empty(16, **meta)
    if base == "nf4":
        return QuantizedWeight("nf4", data, (N, K), absmax=torch.empty(blocks, **meta), code=code, blocksize=blocksize)
    assert base == "nf4-nested", base
    return QuantizedWeight("nf4", data, (N, K), absmax=torch.empty(blocks, dtype=torch.uint8, **meta), code=code,
                           blocksize=blocksize, absmax_code=torch.empty(256, **meta),
                           absmax_scale=torch.empty(math.ceil(blocks / absmax_blocksize), **meta),
                           absmax_blocksize=absmax_blocksize, absmax_offset=torch.empty((), **meta))


def record_lora_linear(table: dict, dtype: str, adapter: str, on: bool, r: int, base: str = "dense",
                       shape: Optional[dict] = None) -> list:
    """The launches (fn, args by name, keyword args) of one forward and one backward of ``lora_linear`` on the
    Triton backend at ``shape`` (default: the reference shape), with ``table``'s configs, recorded from the launcher
    on meta tensors; ``base``: the weight's format (:func:`meta_weight`)."""
    import torch

    from ..ops.lora_linear import triton_backend as launcher, triton_kernels as kernels

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    shape = shape or REFERENCE_SHAPE
    M, K, N = shape["M"], shape["K"], shape["N"]
    meta = dict(device="meta")
    x, w = torch.empty(M, K, dtype=dt[dtype], **meta), meta_weight(base, N, K, dt[dtype])
    A, B = torch.empty(r, K, dtype=dt[adapter], **meta), torch.empty(N, r, dtype=dt[adapter], **meta)
    d = torch.empty(r, dtype=dt[adapter], **meta) if on else None
    bias = torch.empty(N, dtype=dt[dtype], **meta) if on else None
    mA = torch.empty(r, K, dtype=torch.bool, **meta) if on else None
    mB = torch.empty(N, r, dtype=torch.bool, **meta) if on else None
    seed, p = torch.tensor(12345), (0.1 if on else 0.0)
    log: list = []
    triton_mod, tl, _, _ = launcher._triton()
    fake_kernels = type("Kernels", (), {n: _Recorder(getattr(kernels, n), log) for n in
                                        ("lora_down_kernel", "lora_forward_kernel", "lora_dy_kernel",
                                         "lora_dx_kernel", "lora_da_kernel")})()
    saved, deterministic = launcher._triton, torch.are_deterministic_algorithms_enabled()
    launcher._triton = lambda: (triton_mod, tl, fake_kernels, _Configs(table))
    try:
        torch.use_deterministic_algorithms(on)  # features on: slab reductions; off: atomics
        _, h = launcher.forward(x, w, A, B, d, bias, mA, mB, seed, 2.0, p)
        launcher.backward(torch.empty(M, N, dtype=dt[dtype], **meta), x, w, A, B, d, h, mA, mB, seed, 2.0, p,
                          True, True, True, on, on)
    finally:
        launcher._triton = saved
        torch.use_deterministic_algorithms(deterministic)
    return log


_LORA_KEYS = {"lora_down_kernel": "down", "lora_forward_kernel": "forward", "lora_dy_kernel": "dy",
              "lora_dx_kernel": "dx", "lora_da_kernel": "da"}


def _lora_tile(name: str, cx: dict) -> tuple:
    """The (m, n, k) of the GEMM each kernel's main loop computes."""
    dims = {"lora_down_kernel": ("BLOCK_M", "R_PAD", "BLOCK_K"), "lora_forward_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            "lora_dy_kernel": ("BLOCK_M", "R_PAD", "BLOCK_N"), "lora_dx_kernel": ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
            "lora_da_kernel": ("BLOCK_K", "R_PAD", "BLOCK_M")}[name]
    return tuple(cx[d] for d in dims)


def lora_linear_cases(tables: Optional[dict] = None, variants=None, bases=None):
    """The fused LoRA linear kernels as the launcher launches them, per GPU config table and variant: every kernel
    on a dense base, and the kernels that read W (:data:`QUANTIZED_KERNELS`) on each quantized base, at the
    reference shape and (:data:`UNALIGNED_VARIANTS`) at :data:`UNALIGNED_SHAPE`."""
    import triton.language as tl

    from ..ops.lora_linear import triton_configs as configs, triton_kernels as k

    names = {tl.bfloat16: "bf16", tl.float16: "fp16", tl.float32: "fp32"}
    quantized = tuple(QUANTIZED_BASES if bases is None else bases)
    runs = [("dense", v, None) for v in variants or LORA_VARIANTS]
    runs += [(b, v, None) for b in quantized for v in variants or LORA_VARIANTS]
    runs += [(b, v, UNALIGNED_SHAPE) for b in quantized for v in (variants or UNALIGNED_VARIANTS)]
    for table_name, table in (tables or configs.TABLES).items():
        for base, (dtype, adapter, on, r), shape in runs:
            for fn, args, kwargs in record_lora_linear(table, dtype, adapter, on, r, base, shape):
                if base != "dense" and fn.__name__ not in QUANTIZED_KERNELS:
                    continue
                options = {o: kwargs.pop(o) for o in ("num_warps", "num_stages") if o in kwargs}
                sig, cx, attrs = specialize(fn, args, kwargs)
                fmt = "" if base == "dense" else f", {base}"
                at = "" if shape is None else f", K={shape['K']} N={shape['N']}"
                yield Case(f"{fn.__name__}[{table_name}, {dtype}/{adapter}{fmt}, features={'on' if on else 'off'}, "
                           f"r={r}{at}]", fn, sig, cx, attrs, options, table=table_name,
                           tile=_lora_tile(fn.__name__, kwargs), dot_dtype=names[kwargs["DOT_DTYPE"]])
    import torch

    out = torch.empty(64, 64, dtype=torch.int8, device="meta")
    sig, cx, attrs = specialize(k.keep_mask_kernel, dict(out_ptr=out, M=8192, K=4096, seed=7, p=0.1),
                                dict(BLOCK_M=32, BLOCK_K=32))
    yield Case("keep_mask_kernel", k.keep_mask_kernel, sig, cx, attrs, dict(num_warps=4))


def covariance_cases():
    """The covariance kernel with every distinct GPU config of its table (fp32 inputs halve BLOCK_T, as
    ``pick_config`` does), with and without a token mask, on a contiguous (8192, 4096) batch."""
    import torch

    from ..ops.covariance import triton_backend as cov, triton_kernels

    T, K = 8192, 4096
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    seen = []
    for key, table_cfg in cov.CONFIGS.items():
        if key == "interpreter" or table_cfg in seen:
            continue
        seen.append(table_cfg)
        for dtype, mask in itertools.product(("bf16", "fp16", "fp32"), (True, False)):
            if key not in ("H100", "default") and (not mask or dtype == "fp16"):
                continue
            cfg = dict(table_cfg)
            options = {o: cfg.pop(o) for o in ("num_warps", "num_stages")}
            if dtype == "fp32":
                cfg["BLOCK_T"] = max(16, cfg["BLOCK_T"] // 2)
            cx = dict(HAS_MASK=mask, UPCAST=False, IEEE=dtype == "fp32", BLOCK=cfg["BLOCK"], BLOCK_T=cfg["BLOCK_T"])
            args = dict(C=torch.empty(K, K, device="meta"), X=torch.empty(T, K, dtype=dt[dtype], device="meta"),
                        MASK=torch.empty(T, dtype=torch.uint8, device="meta"),
                        TILES=torch.empty(2, dtype=torch.int32, device="meta"),
                        T=T, K=K, stride_xt=K, stride_xk=1, stride_cm=K, stride_cn=1, stride_mask=1 if mask else 0)
            fn = triton_kernels.covariance_upper_kernel
            sig, cx, attrs = specialize(fn, args, cx)
            yield Case(f"covariance[{key}, {dtype}, mask={mask}]", fn, sig, cx, attrs, options, table=key,
                       tile=(cfg["BLOCK"], cfg["BLOCK"], cfg["BLOCK_T"]), dot_dtype=dtype)


def rose_prune_case(dtype: str, prune: bool, clamp: bool, r: int, n_in: int, n_out: int) -> Case:
    """RoseLoRA's fused prune kernel as ``ops/rose_prune/triton_backend.py`` launches it (its block, chunk, warp and
    register rule) on contiguous factors A (r, n_in) and B (n_out, r) of ``dtype`` ("bf16", "fp16", "fp32")."""
    import torch

    from ..ops.rose_prune.triton_backend import _launch_block, _launch_options
    from ..ops.rose_prune.triton_kernels import rose_prune_kernel as fn

    d = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    (block_a, long_a), (block_b, long_b) = _launch_block(n_in), _launch_block(n_out)
    a = lambda dt=d: torch.empty(r, n_in, dtype=dt, device="meta")  # noqa: E731
    b = lambda dt=d: torch.empty(n_out, r, dtype=dt, device="meta")  # noqa: E731
    args = dict(a_ptr=a(), ga_ptr=a(), ia_ptr=a(torch.float32), ma_ptr=a(torch.uint8),
                b_ptr=b(), gb_ptr=b(), ib_ptr=b(torch.float32), mb_ptr=b(torch.uint8),
                count_ptr=torch.empty((), dtype=torch.int64, device="meta"), LINES_A=r, N_A=n_in, N_B=n_out,
                ema=0.8, prune_a=n_in // 2, prune_b=n_out // 2, clamp=0.5)
    for prefix, (s0, s1) in (("a", (n_in, 1)), ("ga", (n_in, 1)), ("ia", (n_in, 1)), ("ma", (n_in, 1)),
                             ("b", (r, 1)), ("gb", (r, 1)), ("ib", (r, 1)), ("mb", (r, 1))):
        args[f"s_{prefix}0"], args[f"s_{prefix}1"] = s0, s1
    sig, cx, attrs = specialize(fn, args, dict(PRUNE=prune, CLAMP=clamp, BLOCK_A=block_a, BLOCK_B=block_b,
                                               LONG_A=long_a, LONG_B=long_b))
    shape = "x".join(f"{n}{'(chunked)' if long else ''}" for n, long in ((n_in, long_a), (n_out, long_b)))
    return Case(f"rose_prune[{dtype}, prune={int(prune)}, clamp={int(clamp)}, r={r}, {shape}]", fn, sig, cx, attrs,
                _launch_options((block_a, long_a), (block_b, long_b)), table="rose_prune")


def rose_prune_cases():
    """The prune kernel at short lines, lines long enough to need 16 warps, and lines streamed in chunks
    (Llama-7B's 11008-wide down_proj input, 28672-wide MLPs, 65536), beside short and long lines of the other
    factor; pruning and clamping on and off. All gated: a spill at any of them fails the check."""
    # (dtype, prune, clamp, r, in_features, out_features)
    for args in [("fp32", True, False, 16, 16, 16), ("fp32", False, False, 16, 4096, 32),
                 ("bf16", True, True, 16, 2048, 16), ("fp32", True, True, 8, 16384, 16384),
                 ("fp16", True, False, 64, 64, 8192), ("bf16", True, True, 16, 11008, 4096),
                 ("bf16", True, False, 16, 4096, 11008), ("bf16", True, True, 64, 28672, 8192),
                 ("fp32", False, False, 16, 65536, 65536), ("fp16", True, True, 16, 8192, 65536),
                 ("bf16", True, False, 16, 11007, 8191)]:  # unaligned rows: no vector loads, an address an entry
        yield rose_prune_case(*args)


GROUPS = {"lora_linear": lora_linear_cases, "covariance": covariance_cases, "rose_prune": rose_prune_cases}


def compile_case(case: Case, target):
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=case.attrs)
    return triton.compile(src, target=target, options=case.options)


def plain_gemm_case(tile: tuple, dtype: str, options: dict) -> Case:
    """The tutorial GEMM with ``tile`` = (BLOCK_M, BLOCK_N, BLOCK_K), contiguous row-major operands, 4096³."""
    import torch

    from .sass_report import plain_gemm_kernel as fn

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    n = 4096
    args = dict(a_ptr=torch.empty(n, n, dtype=dt, device="meta"), b_ptr=torch.empty(n, n, dtype=dt, device="meta"),
                c_ptr=torch.empty(n, n, dtype=dt, device="meta"), M=n, N=n, K=n, stride_am=n, stride_ak=1,
                stride_bk=n, stride_bn=1, stride_cm=n, stride_cn=1)
    cx = dict(BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2], GROUP_M=8)
    sig, cx, attrs = specialize(fn, args, cx)
    return Case(f"plain_gemm[{'x'.join(map(str, tile))}, {dtype}]", fn, sig, cx, attrs, dict(options))


def gate(case: Case, use) -> list[str]:
    """Why a compiled case fails the report's bar (empty: it passes)."""
    problems = []
    if case.table is not None and case.table != "interpreter" and use.stack:
        problems.append(f"spills: {use.stack} B of stack, {use.local_ops} local loads/stores")
    if case.dot_dtype in ("bf16", "fp16") and not (use.wgmma or use.mma):
        problems.append("no tensor-core instruction for its bf16/fp16 dots")
    return problems


def _row(label: str, use, ref=None) -> str:
    tc = f"{use.tensor_core}×{use.wgmma or use.mma}" if use.tensor_core != "none" else "-"
    line = (f"{label:<88} {use.registers:>4} {use.stack:>6} {use.local_ops:>5} {use.shared / 1024:>7.1f} {tc:>9} "
            f"{use.cp_async:>5} {use.tma:>4}")
    if ref is not None:
        rtc = f"{ref.tensor_core}×{ref.wgmma or ref.mma}" if ref.tensor_core != "none" else "-"
        line += f" | {ref.registers:>4} {ref.stack:>6} {rtc:>9} {ref.cp_async:>5}"
    return line


HEADER = (f"{'kernel':<88} {'regs':>4} {'stack':>6} {'l/st':>5} {'smemKiB':>7} {'tensor-c':>9} {'cpasy':>5} "
          f"{'tma':>4} | plain GEMM same tile: regs stack tensor-c cpasy")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (90: H100/H200)")
    parser.add_argument("--only", choices=sorted(GROUPS), nargs="*", help="kernel groups (default: all)")
    parser.add_argument("--report", action="store_true",
                        help="registers, spills, shared memory, tensor-core and async-copy instructions per kernel, "
                             "beside a plain GEMM of the same tile; fail on spills and on missing tensor cores")
    parser.add_argument("--no-reference", action="store_true",
                        help="with --report: skip the plain-GEMM reference compilations (faster; the gate is the same)")
    parser.add_argument("--match", default=None, help="only kernels whose label contains this string")
    parser.add_argument("--shard", default="0/1", help="I/N: compile every N-th kernel starting at the I-th (run N "
                                                       "processes side by side on N cores)")
    args = parser.parse_args(argv)
    try:
        shard, shards = (int(v) for v in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

    import triton
    from triton.backends.compiler import GPUTarget

    from . import sass_report

    target = GPUTarget("cuda", args.arch, 32)
    smem = SMEM_BYTES.get(args.arch, SMEM_BYTES[80])
    failures, count, start, refs = [], 0, time.perf_counter(), {}
    if args.report:
        print(HEADER)
    index = -1
    for group in args.only or sorted(GROUPS):
        for case in GROUPS[group]():
            if args.match and args.match not in case.label:
                continue
            index += 1
            if index % shards != shard:
                continue
            try:
                compiled = compile_case(case, target)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
                if compiled.metadata.shared > smem:
                    raise RuntimeError(f"{compiled.metadata.shared} bytes of shared memory > {smem}")
                count += 1
                if not args.report:
                    continue
                use = sass_report.usage(compiled)
                ref = None
                if case.tile is not None and not args.no_reference:
                    key = (case.tile, case.dot_dtype, tuple(sorted(case.options.items())))
                    if key not in refs:
                        with contextlib.suppress(Exception):  # a tile the plain GEMM cannot take: no reference
                            refs[key] = sass_report.usage(compile_case(
                                plain_gemm_case(case.tile, case.dot_dtype, case.options), target))
                    ref = refs.get(key)
                print(_row(case.label, use, ref), flush=True)
                failures += [f"{case.label}: {why}" for why in gate(case, use)]
            except Exception as exc:  # report every failing kernel, not just the first
                first = str(exc).splitlines()[0] if str(exc) else ""
                failures.append(f"{case.label}: {type(exc).__name__}: {first}")
    print(f"compile_check: triton {triton.__version__}, sm_{args.arch}: {count} compiled, {len(failures)} failed "
          f"in {time.perf_counter() - start:.0f} s")
    for line in failures:
        print("  FAILED " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
