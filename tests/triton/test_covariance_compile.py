"""The covariance kernel compiles for sm_90 with every GPU config of its table (ahead of time: no GPU needed).

The interpreter that runs tests/ops/test_covariance.py on CPU accepts programs the GPU compiler rejects (dot shapes,
dtype mixes, shared memory beyond the SM's), so this closes that gap in CI.
"""
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from loranull_kernels.triton import covariance as cov

SMEM_H100 = 227 * 1024
failures = []
gpu_keys, seen = [], []
for k, v in cov.CONFIGS.items():  # one compile per distinct config (H200 shares H100's)
    if k != "interpreter" and v not in seen:
        gpu_keys.append(k)
        seen.append(v)
for key, dt, mask in itertools.product(gpu_keys, ["bf16", "fp16", "fp32"], [True, False]):
    if key not in ("H100", "default") and (not mask or dt == "fp16"):
        continue
    cfg = dict(cov.CONFIGS[key])
    if dt == "fp32":
        cfg["BLOCK_T"] = max(16, cfg["BLOCK_T"] // 2)  # as pick_config does
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    cx = dict(HAS_MASK=mask, UPCAST=False, IEEE=dt == "fp32", BLOCK=cfg["BLOCK"], BLOCK_T=cfg["BLOCK_T"])
    sig = {"C": "*fp32", "X": "*" + dt, "MASK": "*u8", "TILES": "*i32"}
    sig.update({p: "i32" for p in ("T", "K", "stride_xt", "stride_xk", "stride_cm", "stride_cn", "stride_mask")})
    sig.update({k: "constexpr" for k in cx})
    try:
        c = triton.compile(ASTSource(fn=cov._covariance_upper_kernel, signature=sig, constexprs=cx),
                           target=GPUTarget("cuda", 90, 32), options=options)
        assert c.asm.get("cubin"), "no cubin"
        assert c.metadata.shared <= SMEM_H100, f"{c.metadata.shared} bytes of shared memory"
    except Exception as exc:
        failures.append(f"{key}/{dt}/mask={mask}: {type(exc).__name__}: {exc}")
print("\n".join(failures) if failures else "all compiled")
sys.exit(1 if failures else 0)
"""


@pytest.mark.slow
def test_covariance_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all compiled" in proc.stdout
