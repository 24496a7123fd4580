"""Compile every lora_linear kernel for a GPU architecture without a GPU (ahead of time, to PTX and cubin).

Triton's interpreter accepts programs the GPU compiler rejects (``tl.dot`` dims below 16, dtype mixes, layouts),
so CI, which has no GPU, runs this to catch them before a GPU session does::

    python -m loranull_kernels.triton.compile_check --arch 90

Each kernel is compiled with the launch configurations of the GPU tables in :mod:`.configs`, for bf16/fp16/fp32
inputs, with its optional features on and off, and for small and large rank padding. Must run with
``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction``s).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

_TYPE_OF = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# Pointer arguments by name: the input's dtype, the adapter's dtype, or fixed.
_INPUT_PTRS = {"x_ptr", "w_ptr", "y_ptr", "dy_ptr", "dx_ptr", "bias_ptr"}
_ADAPTER_PTRS = {"a_ptr", "b_ptr", "d_ptr"}
_FIXED_PTRS = {"h_ptr": "*fp32", "dg_ptr": "*fp32", "db_ptr": "*fp32", "dbias_ptr": "*fp32", "da_ptr": "*fp32",
               "ma_ptr": "*u8", "mb_ptr": "*u8", "out_ptr": "*i8"}
_FLOAT_SCALARS = {"p", "keep_scale", "scaling"}
_KERNELS = {  # kernel attribute -> config table key (None: fixed small tiles)
    "lora_down_kernel": "down",
    "lora_forward_kernel": "forward",
    "lora_dy_kernel": "dy",
    "lora_dx_kernel": "dx",
    "lora_da_kernel": "da",
    "keep_mask_kernel": None,
}


def _signature(fn, dtype: str, adapter: str, constexprs: dict) -> dict:
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in _INPUT_PTRS:
            sig[name] = _TYPE_OF[dtype]
        elif name in _ADAPTER_PTRS:
            sig[name] = _TYPE_OF[adapter]
        elif name in _FIXED_PTRS:
            sig[name] = _FIXED_PTRS[name]
        elif name == "seed":
            sig[name] = "i64"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise KeyError(f"{fn.__name__}: no value for constexpr(s) {missing}")
    return sig


def cases(table: dict):
    """Yield (kernel name, input dtype, adapter dtype, constexprs, options) to compile."""
    import triton.language as tl

    dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    variants = [("bf16", "bf16", True, 16), ("bf16", "fp32", False, 128), ("fp16", "fp16", True, 32),
                ("fp32", "fp32", False, 16)]
    for name, key in _KERNELS.items():
        for dtype, adapter, flags, r_pad in variants:
            if key is None:
                if (dtype, flags) != ("bf16", True):
                    continue
                yield name, dtype, adapter, dict(BLOCK_M=32, BLOCK_K=32), dict(num_warps=4)
                continue
            cfg = dict(table[key])
            options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
            cfg.pop("SPLIT_M", None)
            constexprs = dict(cfg, R_PAD=r_pad, DOT_DTYPE=dot[dtype], PRECISION="ieee" if dtype == "fp32" else "tf32")
            for flag in ("HAS_MASK_A", "HAS_MASK_B", "HAS_DROPOUT", "HAS_RANK_SCALE", "HAS_BIAS", "NEED_DB",
                         "NEED_DBIAS", "ATOMIC"):
                constexprs[flag] = flags if flag != "ATOMIC" else not flags
            yield name, dtype, adapter, constexprs, options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (90: H100/H200)")
    parser.add_argument("--table", default="default", help="config table of loranull_kernels.triton.configs")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import configs
    from . import lora_linear as kernels

    target = GPUTarget("cuda", args.arch, 32)
    failures, count, start = [], 0, time.perf_counter()
    for name, dtype, adapter, constexprs, options in cases(configs.TABLES[args.table]):
        fn = getattr(kernels, name)
        used = {p.name for p in fn.params}
        cx = {k: v for k, v in constexprs.items() if k in used}
        label = f"{name}[{dtype}/{adapter}, " + ", ".join(f"{k}={v}" for k, v in cx.items() if k != "DOT_DTYPE") + "]"
        try:
            src = ASTSource(fn=fn, signature=_signature(fn, dtype, adapter, cx), constexprs=cx)
            compiled = triton.compile(src, target=target, options=options)
            if not compiled.asm.get("cubin"):
                raise RuntimeError("no cubin produced")
            count += 1
        except Exception as exc:  # report every failing kernel, not just the first
            failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    print(f"compile_check: triton {triton.__version__}, sm_{args.arch}, table {args.table!r}: "
          f"{count} compiled, {len(failures)} failed in {time.perf_counter() - start:.0f} s")
    for line in failures:
        print("  FAILED " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
