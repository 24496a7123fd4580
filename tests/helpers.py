"""Shared test utilities: tolerances by dtype, poisoned outputs, float64 copies."""
from __future__ import annotations

import torch

# Relative-to-scale tolerances (docs/design.md#tests): fp32 ~1e-5, half precision ~1e-2.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "tensor",
                 tol: float | None = None, magnitude: torch.Tensor | None = None):
    """Max abs error ≤ tol · max(1, max|expected|); NaN/Inf in `actual` always fails.

    ``magnitude``: where an entry is a sum that can cancel, the size of what was summed (the same computation on
    absolute values), whose max replaces max|expected| when larger: rounding error scales with it, not with the
    result."""
    assert actual is not None, f"{name}: got None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    tol = TOL[dtype] if tol is None else tol
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    if magnitude is not None and magnitude.numel():
        scale = max(scale, magnitude.detach().to(torch.float64).abs().max().item())
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:.1e} × scale {scale:.3e}"


def f64(t: torch.Tensor | None, requires_grad: bool | None = None) -> torch.Tensor | None:
    """A float64 leaf copy (bool tensors are returned as they are)."""
    if t is None or t.dtype == torch.bool:
        return t
    c = t.detach().to(torch.float64).clone()
    if requires_grad if requires_grad is not None else t.requires_grad:
        c.requires_grad_(True)
    return c


def free_port() -> int:
    """A free TCP port on the loopback interface (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_join(fn, args: tuple, nprocs: int, timeout_s: float = 300.0) -> None:
    """``torch.multiprocessing.spawn`` with a deadline: a hung worker fails the test instead of stalling CI until its
    time limit (errors raised in a worker propagate as with ``spawn(join=True)``)."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{nprocs} worker processes of {getattr(fn, '__name__', fn)} did not finish in {timeout_s:.0f} s")


def gloo_worker(rank: int, world_size: int, port: int, out_dir: str, body) -> None:
    """The scaffolding of a 2-process training test's worker: rendezvous on the loopback ``port`` with gloo, one
    thread, ``result = body(rank)``, ``torch.save(result, out_dir/rank{rank}.pt)``, a barrier, then exit.

    It leaves without running destructors: freeing DDP's Reducer drops the last reference to the gloo process group,
    whose destructor joins its worker thread while holding the GIL, and that thread may need the GIL to release a
    finished work item: a deadlock seen on this CPU machine (py-spy: ~ProcessGroupGloo -> thread::join vs
    gil_scoped_acquire in runLoop). The results are on disk; exit code 0 tells torch.multiprocessing it succeeded."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(body(rank), f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)


def magnitudes(run, leaves: dict, grad_out: torch.Tensor):
    """The same float64 computation on absolute values: the size of what each output and gradient entry sums, which
    float32 rounding scales with (:func:`assert_close`'s ``magnitude``). Fresh random inputs now and then make a
    sum cancel, and a tolerance scaled by the result alone then fails on correct code.

    ``run(leaves) -> output`` on a dict of float64 leaves (None stays None); returns the output and the leaves'
    gradients (None where a leaf is None or takes no gradient)."""
    mag = {k: None if v is None else f64(v, requires_grad=False).abs().requires_grad_(v.requires_grad)
           for k, v in leaves.items()}
    out = run(mag)
    out.backward(f64(grad_out).abs())
    return out, {k: None if v is None else v.grad for k, v in mag.items()}
