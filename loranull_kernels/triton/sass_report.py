"""What the compiler made of a kernel, read from its cubin and PTX without a GPU.

``ptxas`` decides registers and spills, and the PTX shows which tensor-core instructions and asynchronous copies the
Triton pipeline emitted; both are in the compiled kernel, so a CPU machine can see whether a kernel spills to local
memory on sm_90 or misses warp-group MMA. The tools come with the Triton wheel (``triton/backends/nvidia/bin``).

Also the plain tutorial GEMM (``plain_gemm_kernel``) that each kernel's main loop is compared with: the same tile,
warps and stages with nothing fused in, the best a Triton main loop of that shape gets.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# PTX opcodes by family: the count is of instructions in the whole kernel (a K loop unrolled by the pipeliner
# shows each MMA once per stage it issues in).
_PTX = {
    "wgmma": r"^\s*wgmma\.mma_async\.",
    "mma": r"^\s*mma\.sync\.",
    "cp_async": r"^\s*cp\.async\.(?:ca|cg)\.",
    "tma": r"^\s*cp\.async\.bulk\.tensor\.",
}


@dataclasses.dataclass
class Usage:
    """Resources of one compiled kernel. ``stack`` bytes per thread are spills (Triton kernels keep no local
    arrays); ``local_ops`` counts LDL/STL instructions in the SASS (spill traffic)."""

    registers: int
    stack: int
    local_ops: int
    shared: int
    wgmma: int
    mma: int
    cp_async: int
    tma: int

    @property
    def tensor_core(self) -> str:
        return "wgmma" if self.wgmma else ("mma" if self.mma else "none")


def tool(name: str) -> str:
    """Path of a CUDA binary tool shipped with Triton (falls back to the one on PATH)."""
    path = os.path.join(_BIN, name)
    return path if os.path.exists(path) else name


def usage(compiled) -> Usage:
    """Resource usage of a ``triton.compile`` result (must hold a cubin)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    if regs is None or stack is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {res.strip()[:200]}")
    ptx = compiled.asm["ptx"]
    counts = {k: len(re.findall(p, ptx, flags=re.MULTILINE)) for k, p in _PTX.items()}
    local_ops = len(re.findall(r"\b(?:LDL|STL)(?:\.[A-Z0-9]+)*\s", sass))
    return Usage(registers=int(regs.group(1)), stack=int(stack.group(1)), local_ops=local_ops,
                 shared=int(compiled.metadata.shared), **counts)


@triton.jit
def plain_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The Triton tutorial GEMM ``C = A B`` (fp32 accumulation, grouped tile order): the reference main loop."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
