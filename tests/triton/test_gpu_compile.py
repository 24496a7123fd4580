"""Every Triton kernel of the package compiles for sm_90 (ahead of time: no GPU needed) as its launcher launches
it, within the SM's shared memory, without spilling registers at the configs the GPU tables use, and with
tensor-core instructions for its bf16/fp16 dots (``compile_check --report``). The interpreter that runs the other
kernel tests on CPU accepts programs the GPU compiler rejects and says nothing about registers, so this closes
that gap in CI."""
import os
import subprocess
import sys

import pytest


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


@pytest.mark.slow
def test_all_kernels_compile_for_sm90_without_spills_and_with_tensor_cores():
    # --no-reference: the plain-GEMM comparison is for people reading the report; the gate does not need it.
    # Two shards side by side: CI has two cores, and each compilation is single-threaded.
    shards = 2
    procs = [subprocess.Popen([sys.executable, "-m", "loranull_kernels.triton.compile_check", "--arch", "90",
                               "--report", "--no-reference", "--shard", f"{i}/{shards}"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    outs = [p.communicate(timeout=1200) for p in procs]
    stdout = "".join(o for o, _ in outs)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-6000:] + err[-3000:]
        assert " 0 failed" in out and " 0 compiled" not in out, out[-3000:]
    # Every lora_linear kernel appears, with its resources, for each variant of the table.
    for name in ("lora_down_kernel", "lora_forward_kernel", "lora_dy_kernel", "lora_dx_kernel", "lora_da_kernel"):
        assert stdout.count(name + "[default") >= 5, name


_GATE_SCRIPT = r"""
import json, os
from triton.backends.compiler import GPUTarget
from loranull_kernels.triton import compile_check as cc, sass_report
target = GPUTarget("cuda", 90, 32)
out = {}
for name, tile, dtype, options in [("good", (128, 128, 64), "bf16", dict(num_warps=8, num_stages=3)),
                                   ("spilling", (256, 256, 64), "fp32", dict(num_warps=4, num_stages=2))]:
    case = cc.plain_gemm_case(tile, dtype, options)
    case.table, case.dot_dtype = "default", dtype
    use = sass_report.usage(cc.compile_case(case, target))
    out[name] = dict(use.__dict__, problems=cc.gate(case, use), const=sorted(k for k, v in case.constexprs.items()
                                                                               if v == 1))
print(json.dumps(out))
"""


def test_report_reads_registers_spills_and_tensor_cores_from_the_cubin():
    """A tutorial GEMM at the forward kernel's tile gets warp-group MMA, async copies and no spill; a 256×256 fp32
    accumulator on 4 warps (512 values a thread) must spill, and the gate must say so."""
    import json

    proc = subprocess.run([sys.executable, "-c", _GATE_SCRIPT], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    good, bad = out["good"], out["spilling"]
    assert good["wgmma"] > 0 and good["cp_async"] > 0 and good["stack"] == 0 and good["problems"] == []
    assert good["registers"] <= 255 and good["shared"] > 0
    assert set(good["const"]) == {"stride_ak", "stride_bn", "stride_cn"}  # unit strides specialised, as the JIT does
    assert bad["stack"] > 0 and bad["local_ops"] > 0
    assert any("spills" in p for p in bad["problems"])


def test_gate_flags_a_half_precision_kernel_without_tensor_cores():
    from loranull_kernels.triton.compile_check import Case, gate
    from loranull_kernels.triton.sass_report import Usage

    case = Case("k", None, {}, {}, {}, {}, table="default", dot_dtype="bf16")
    no_tc = Usage(registers=90, stack=0, local_ops=0, shared=0, wgmma=0, mma=0, cp_async=4, tma=0)
    assert gate(case, no_tc) == ["no tensor-core instruction for its bf16/fp16 dots"]
    assert gate(case, Usage(90, 0, 0, 0, wgmma=4, mma=0, cp_async=4, tma=0)) == []
    assert gate(Case("k", None, {}, {}, {}, {}, table=None, dot_dtype="fp32"), Usage(255, 64, 8, 0, 0, 0, 0, 0)) == []
