"""RoseLoRA's fused kernel compiles for sm_90 (ahead of time: no GPU needed), for the launch shapes ``rose_prune_``
uses: fp32 / bf16 factors, pruning and clamping on and off, short lines and lines long enough to need 16 warps.

The interpreter that runs tests/methods/test_roselora.py accepts programs the GPU compiler rejects (loop-carried
scalar types, reductions over bitcast integers), so this closes that gap in CI.
"""
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from loranull_kernels.triton.rose_prune import rose_prune_kernel as kernel

CASES = [  # (factor dtype, PRUNE, CLAMP, BLOCK_A, BLOCK_B, num_warps): what ops/rose_prune.py launches
    ("fp32", True, False, 16, 16, 4), ("fp32", False, False, 4096, 32, 8), ("bf16", True, True, 2048, 16, 4),
    ("fp32", True, True, 16384, 16384, 16), ("fp16", True, False, 64, 8192, 8),
]
failures = []
for dt, prune, clamp, block_a, block_b, warps in CASES:
    sig = {}
    for p in kernel.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n in ("a_ptr", "ga_ptr", "b_ptr", "gb_ptr"):
            sig[n] = "*" + dt
        elif n in ("ia_ptr", "ib_ptr"):
            sig[n] = "*fp32"
        elif n in ("ma_ptr", "mb_ptr"):
            sig[n] = "*u8"
        elif n == "count_ptr":
            sig[n] = "*i64"
        elif n in ("ema", "clamp"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    cx = dict(PRUNE=prune, CLAMP=clamp, BLOCK_A=block_a, BLOCK_B=block_b)
    try:
        c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps))
        assert c.asm.get("cubin"), "no cubin"
    except Exception as exc:
        failures.append(f"{dt}/prune={prune}/clamp={clamp}/{block_a}x{block_b}: {type(exc).__name__}: {exc}")
print("\n".join(failures) if failures else "all compiled")
sys.exit(1 if failures else 0)
"""


@pytest.mark.slow
def test_rose_prune_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all compiled" in proc.stdout
