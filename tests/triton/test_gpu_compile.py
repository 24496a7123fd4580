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
    # Every lora_linear kernel appears, with its resources, for each variant of the table; the two that read W
    # also on each quantized base, at the reference shape and at an unaligned one.
    for name in ("lora_down_kernel", "lora_forward_kernel", "lora_dy_kernel", "lora_dx_kernel", "lora_da_kernel"):
        assert stdout.count(name + "[default") >= 5, name
    for base in ("nf4", "nf4-nested", "int8"):
        for name in ("lora_forward_kernel", "lora_dx_kernel"):
            rows = [line for line in stdout.splitlines() if line.startswith(f"{name}[default") and f", {base}," in line]
            assert len(rows) >= 8 and sum("K=4097" in line for line in rows) >= 3, (name, base, rows)


def test_quantized_launch_arguments_and_configs():
    """What the compile check compiles for a quantized base is what the launcher passes: the packed data itself
    (never a dense W), the format's tables and constexprs, and the table's ``:quant`` configs; a dense base keeps
    its launch (W, its strides, the dense constexprs, the dense configs). In a process without the interpreter,
    whose kernels are not JIT functions."""
    proc = subprocess.run([sys.executable, "-c", "from tests.triton.test_gpu_compile import _check_quantized_launches "
                           "as check; check(); print('ok')"], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _check_quantized_launches():
    import torch

    from loranull_kernels.ops.lora_linear import triton_configs
    from loranull_kernels.triton import compile_check as cc

    table = triton_configs.TABLES["default"]
    launches = {}
    for base in ("dense", "nf4", "nf4-nested", "int8"):
        log = cc.record_lora_linear(table, "bf16", "bf16", True, 16, base)
        launches[base] = {fn.__name__: (args, kw) for fn, args, kw in log}
    K = cc.REFERENCE_SHAPE["K"]
    for name, key in (("lora_forward_kernel", "forward"), ("lora_dx_kernel", "dx")):
        args, kw = launches["dense"][name]
        assert kw["W_FORMAT"] == "dense" and args["w_ptr"].dtype == torch.bfloat16
        assert kw["BLOCK_K"] == table[key]["BLOCK_K"]
        for base in ("nf4", "nf4-nested"):
            args, kw = launches[base][name]
            assert (kw["W_FORMAT"], kw["W_NESTED"], kw["W_BLOCK"]) == ("4bit", base == "nf4-nested", 64)
            assert kw["W_ABSMAX_BLOCK"] == (256 if base == "nf4-nested" else 1)
            assert args["w_ptr"].dtype == torch.uint8 and args["w_code_ptr"].shape == (16,)
            assert (args["stride_wn"], args["stride_wk"]) == (K, 1)
            if base == "nf4-nested":
                assert args["w_absmax_ptr"].dtype == torch.uint8 and args["w_absmax_code_ptr"].shape == (256,)
                assert args["w_absmax_offset_ptr"].dim() == 0
            chosen = table.get(f"{key}:quant", table[key])  # the whole :quant config, not only a shared BLOCK_K
            assert {k: kw[k] for k in chosen if k in kw} == {k: v for k, v in chosen.items() if k in kw}
            assert all(k in kw for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        args, kw = launches["int8"][name]
        assert kw["W_FORMAT"] == "int8" and args["w_ptr"].dtype == torch.int8
        assert args["w_absmax_ptr"].dtype == torch.float32 and args["w_absmax_ptr"].shape == (cc.REFERENCE_SHAPE["N"],)
    for name in ("lora_down_kernel", "lora_dy_kernel", "lora_da_kernel"):  # never read W: launched alike
        assert launches["nf4"][name][1] == launches["dense"][name][1]
    assert triton_configs.lookup(table, "dx", torch.bfloat16, quantized=True) == table["dx:quant"]
    assert triton_configs.lookup(table, "dx", torch.float32, quantized=True) == table["dx:quant:fp32"]
    assert triton_configs.lookup(table, "dx", torch.float32) == table["dx:fp32"]
    assert triton_configs.lookup(table, "down", torch.float32, quantized=True) == table["down"]


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
