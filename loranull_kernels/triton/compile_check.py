"""Compile every Triton kernel of the package for a GPU architecture without a GPU (ahead of time, to cubin).

Triton's interpreter, which runs the kernel tests on CPU, accepts programs the GPU compiler rejects (``tl.dot``
shapes, dtype mixes, loop-carried scalar types, shared memory beyond the SM's), so CI, which has no GPU, runs::

    python -m loranull_kernels.triton.compile_check --arch 90

Each kernel is compiled with the launch configurations its dispatch code uses on a GPU (the config tables), for
bf16/fp16/fp32 inputs and with its optional features on and off, and must fit the SM's shared memory. Run it with
``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction``s). It also serves a GPU session to check
another Triton version (3.6 there) before running anything.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

SMEM_BYTES = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100/H200)
_TYPE_OF = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(fn, ptr_types: dict, float_scalars=(), i64_scalars=()) -> dict:
    """Kernel signature from its parameters: pointers by name (``ptr_types``), named float/int64 scalars, the
    rest int32, constexprs as such."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ptr_types:
            sig[p.name] = ptr_types[p.name]
        elif p.name in float_scalars:
            sig[p.name] = "fp32"
        elif p.name in i64_scalars:
            sig[p.name] = "i64"
        else:
            sig[p.name] = "i32"
    return sig


def _split_options(cfg: dict) -> tuple[dict, dict]:
    cfg = dict(cfg)
    return cfg, {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}


def lora_linear_cases():
    """(label, fn, signature, constexprs, options) for the fused LoRA linear kernels, per the GPU config tables."""
    import triton.language as tl

    from . import configs
    from . import lora_linear as k

    dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    flags = ("HAS_MASK_A", "HAS_MASK_B", "HAS_DROPOUT", "HAS_RANK_SCALE", "HAS_BIAS", "NEED_DB", "NEED_DBIAS")
    # (input dtype, adapter dtype, optional features on, R_PAD): bf16/fp16 adapters and fp32 adapters beside bf16.
    variants = [("bf16", "bf16", True, 16), ("bf16", "fp32", False, 128), ("fp16", "fp16", True, 32),
                ("fp32", "fp32", False, 16)]
    kernels = {"lora_down_kernel": "down", "lora_forward_kernel": "forward", "lora_dy_kernel": "dy",
               "lora_dx_kernel": "dx", "lora_da_kernel": "da"}
    for table_name, table in configs.TABLES.items():
        for name, key in kernels.items():
            fn = getattr(k, name)
            used = {p.name for p in fn.params}
            for dtype, adapter, on, r_pad in variants:
                cfg, options = _split_options(table[key])
                cfg.pop("SPLIT_M", None)
                cx = dict(cfg, R_PAD=r_pad, DOT_DTYPE=dot[dtype], PRECISION="ieee" if dtype == "fp32" else "tf32",
                          ATOMIC=not on, **{f: on for f in flags})
                cx = {n: v for n, v in cx.items() if n in used}
                ptrs = {p: _TYPE_OF[dtype] for p in ("x_ptr", "w_ptr", "y_ptr", "dy_ptr", "dx_ptr", "bias_ptr")}
                ptrs.update({p: _TYPE_OF[adapter] for p in ("a_ptr", "b_ptr", "d_ptr")})
                ptrs.update({p: "*fp32" for p in ("h_ptr", "dg_ptr", "db_ptr", "dbias_ptr", "da_ptr")})
                ptrs.update(ma_ptr="*u8", mb_ptr="*u8")
                sig = _signature(fn, ptrs, float_scalars=("p", "keep_scale", "scaling"), i64_scalars=("seed",))
                yield (f"{name}[{table_name}, {dtype}/{adapter}, features={'on' if on else 'off'}, R_PAD={r_pad}]",
                       fn, sig, cx, options)
    sig = _signature(k.keep_mask_kernel, {"out_ptr": "*i8"}, float_scalars=("p",), i64_scalars=("seed",))
    yield "keep_mask_kernel", k.keep_mask_kernel, sig, dict(BLOCK_M=32, BLOCK_K=32), dict(num_warps=4)


def covariance_cases():
    """The covariance kernel with every distinct GPU config of its table (fp32 inputs halve BLOCK_T, as
    ``pick_config`` does), with and without a token mask."""
    from . import covariance as cov

    seen = []
    for key, table_cfg in cov.CONFIGS.items():
        if key == "interpreter" or table_cfg in seen:
            continue
        seen.append(table_cfg)
        for dtype, mask in itertools.product(("bf16", "fp16", "fp32"), (True, False)):
            if key not in ("H100", "default") and (not mask or dtype == "fp16"):
                continue
            cfg, options = _split_options(table_cfg)
            if dtype == "fp32":
                cfg["BLOCK_T"] = max(16, cfg["BLOCK_T"] // 2)
            cx = dict(HAS_MASK=mask, UPCAST=False, IEEE=dtype == "fp32", BLOCK=cfg["BLOCK"], BLOCK_T=cfg["BLOCK_T"])
            fn = cov._covariance_upper_kernel
            sig = _signature(fn, {"C": "*fp32", "X": _TYPE_OF[dtype], "MASK": "*u8", "TILES": "*i32"})
            yield f"covariance[{key}, {dtype}, mask={mask}]", fn, sig, cx, options


def rose_prune_cases():
    """RoseLoRA's fused prune kernel for the launch shapes ``ops/rose_prune.py`` uses: short lines, and lines long
    enough to need 16 warps; pruning and clamping on and off."""
    from .rose_prune import rose_prune_kernel as fn

    cases = [("fp32", True, False, 16, 16, 4), ("fp32", False, False, 4096, 32, 8), ("bf16", True, True, 2048, 16, 4),
             ("fp32", True, True, 16384, 16384, 16), ("fp16", True, False, 64, 8192, 8)]
    for dtype, prune, clamp, block_a, block_b, warps in cases:
        ptrs = {p: _TYPE_OF[dtype] for p in ("a_ptr", "ga_ptr", "b_ptr", "gb_ptr")}
        ptrs.update(ia_ptr="*fp32", ib_ptr="*fp32", ma_ptr="*u8", mb_ptr="*u8", count_ptr="*i64")
        sig = _signature(fn, ptrs, float_scalars=("ema", "clamp"))
        cx = dict(PRUNE=prune, CLAMP=clamp, BLOCK_A=block_a, BLOCK_B=block_b)
        yield (f"rose_prune[{dtype}, prune={prune}, clamp={clamp}, {block_a}x{block_b}]", fn, sig, cx,
               dict(num_warps=warps))


GROUPS = {"lora_linear": lora_linear_cases, "covariance": covariance_cases, "rose_prune": rose_prune_cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (90: H100/H200)")
    parser.add_argument("--only", choices=sorted(GROUPS), nargs="*", help="kernel groups (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    smem = SMEM_BYTES.get(args.arch, SMEM_BYTES[80])
    failures, count, start = [], 0, time.perf_counter()
    for group in args.only or sorted(GROUPS):
        for label, fn, sig, cx, options in GROUPS[group]():
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=target, options=options)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
                if compiled.metadata.shared > smem:
                    raise RuntimeError(f"{compiled.metadata.shared} bytes of shared memory > {smem}")
                count += 1
            except Exception as exc:  # report every failing kernel, not just the first
                first = str(exc).splitlines()[0] if str(exc) else ""
                failures.append(f"{label}: {type(exc).__name__}: {first}")
    print(f"compile_check: triton {triton.__version__}, sm_{args.arch}: {count} compiled, {len(failures)} failed "
          f"in {time.perf_counter() - start:.0f} s")
    for line in failures:
        print("  FAILED " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
