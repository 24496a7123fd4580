"""Calibration benchmarks (issue 3): the covariance kernel and the randomized SVD, against what people use today.

1. ``covariance``: ``covariance_update`` (Triton on CUDA, the PyTorch fallback everywhere) vs the usual
   ``X.float().T @ X.float()`` and vs an ``addmm_`` in the input dtype (bf16 accumulation into a bf16 C). On CUDA
   also the bf16 ``torch.matmul`` rate of the same shape, and the Triton kernel's fraction of it counting only the
   triangle's FLOPs (``T·K·(K+1)``), the target of docs/performance.md#calibration. Each provider's error vs float64.
2. ``rsvd``: ``lk.rsvd`` vs ``torch.linalg.svd`` (exact) and ``torch.svd_lowrank`` (same sketch size and power
   iterations) on square matrices with a known ``σ_i = 1/i`` spectrum: time and tail-energy error ratio
   ``‖M − U S Vh‖²_F / Σ_{i>k} σ_i²`` (1 is optimal).
3. ``batched``: one batched ``lk.rsvd`` call on a stack of same-shape matrices vs Python loops.

Run ``python benchmarks/bench_calibration.py [--quick] [--only covariance rsvd batched]`` from a checkout (the
package installed); writes ``calibration[_quick]_{device}.csv`` and ``.png`` to ``--out-dir`` (default:
``$LORANULL_RESULTS`` or ``~/.cache/loranull_kernels/results``; ``--out-dir benchmarks/results`` rewrites the
committed results) and prints Markdown tables.
"""
from __future__ import annotations

import argparse

import torch

from loranull_kernels import backend, reference
from loranull_kernels.bench import harness
from loranull_kernels.ops.covariance import covariance_update
from loranull_kernels.ops.rsvd import default_oversample, rsvd


# ---- inputs ------------------------------------------------------------------------------------------------------

def known_spectrum(batch: int, m: int, n: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, m, n) float32 ``U diag(1/i) Vᵀ`` with random orthonormal U, V; and the spectrum (float64, CPU)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(batch, m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(batch, n, k, generator=g)).Q
    return ((U * s.float()) @ V.transpose(-1, -2)).to(device), s


def _rel_err(C: torch.Tensor, ref: torch.Tensor) -> float:
    return ((C.double().cpu() - ref).abs().max() / ref.abs().max()).item()


# ---- 1. covariance -----------------------------------------------------------------------------------------------

def covariance_cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        Ks = (4096,) if quick else (1024, 4096, 11008)
        return [(8192, K, dt) for K in Ks for dt in (torch.bfloat16, torch.float16)]
    Ks = (512, 1024) if quick else (512, 1024, 2048)
    return [(2048, K, dt) for K in Ks for dt in (torch.float32, torch.bfloat16)]


def bench_covariance(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    rows = []
    from tqdm.auto import tqdm

    for T, K, dtype in tqdm(covariance_cases(device, quick), desc="covariance", unit="shape"):
        x = torch.randn(T, K, device=device).to(dtype)
        C = torch.zeros(K, K, device=device)
        C_low = torch.zeros(K, K, device=device, dtype=dtype)
        ref = reference.covariance_update(torch.zeros(K, K), x.cpu())

        def lk(name):
            def run():
                with backend.use(name):
                    covariance_update(C, x)
            return run

        fns = {}
        if device.type == "cuda":
            fns["lk-triton"] = lk("triton")
        fns["lk-torch"] = lk("torch")
        fns["X.float().T@X.float()"] = lambda: x.float().t() @ x.float()
        if dtype != torch.float32:
            fns[f"addmm_ {str(dtype)[6:]}"] = lambda: C_low.addmm_(x.t(), x)
        xt = x.t().contiguous()
        if device.type == "cuda":
            fns["matmul (rate)"] = lambda: torch.matmul(xt, x)

        errors = {}
        for name, fn in fns.items():
            C.zero_()
            C_low.zero_()
            out = fn()
            if name.startswith("lk"):
                errors[name] = _rel_err(C, ref)
            elif name.startswith("addmm_"):
                errors[name] = _rel_err(C_low, ref)
            elif name.startswith("X.float"):
                errors[name] = _rel_err(out, ref)
        timings = harness.time_interleaved(fns, rounds=rounds, warmup=1 if device.type == "cpu" else 5, device=device)
        base = timings["X.float().T@X.float()"]["median_ms"]
        mm_rate = 2 * T * K * K / timings["matmul (rate)"]["median_ms"] / 1e9 if "matmul (rate)" in timings else None
        for name, t in timings.items():
            row = dict(bench="covariance", T=T, K=K, dtype=str(dtype)[6:], provider=name, median_ms=t["median_ms"],
                       p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], speedup_vs_float_matmul=base / t["median_ms"],
                       tflops_full=2 * T * K * K / t["median_ms"] / 1e9, rel_error=errors.get(name, float("nan")))
            if name == "lk-triton" and mm_rate:
                tri = T * K * (K + 1) / t["median_ms"] / 1e9
                row.update(triangle_tflops=tri, frac_of_matmul=tri / mm_rate)
            rows.append(row)
    return rows


# ---- 2. rsvd -----------------------------------------------------------------------------------------------------

def rsvd_cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        return [(4096, 128)] if quick else [(2048, 128), (4096, 128), (8192, 128)]
    return [(1024, 64)] if quick else [(1024, 32), (1024, 128), (2048, 128)]


def _error_ratio(M, s, U, S, Vh, rank) -> float:
    err = reference.approximation_error(M.cpu(), U.cpu(), S.cpu(), Vh.cpu())
    return (err / (s[rank:] ** 2).sum()).mean().item()


def bench_rsvd(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    for n, rank in tqdm(rsvd_cases(device, quick), desc="rsvd", unit="shape"):
        M3, s = known_spectrum(1, n, n, device)
        M = M3[0]
        l = rank + default_oversample(rank)
        fns = {
            "lk.rsvd": lambda: rsvd(M, rank, seed=0),
            "torch.svd_lowrank": lambda: torch.svd_lowrank(M, q=l, niter=2),
            "torch.linalg.svd": lambda: torch.linalg.svd(M, full_matrices=False),
        }
        if device.type == "cuda":
            def torch_path():
                with backend.use("torch"):
                    return rsvd(M, rank, seed=0)
            fns["lk.rsvd (torch path)"] = torch_path
        errors = {}
        for name, fn in fns.items():
            U, S, V = fn()
            Vh = V.t() if name == "torch.svd_lowrank" else V
            errors[name] = _error_ratio(M, s, U[:, :rank], S[:rank], Vh[:rank], rank)
        timings = harness.time_interleaved(fns, rounds=rounds, warmup=1, device=device)
        base = timings["torch.linalg.svd"]["median_ms"]
        for name, t in timings.items():
            rows.append(dict(bench="rsvd", m=n, n=n, rank=rank, sketch=l, n_iter=2, provider=name,
                             median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                             speedup_vs_linalg_svd=base / t["median_ms"], error_ratio=errors[name]))
    return rows


# ---- 3. batched --------------------------------------------------------------------------------------------------

def batched_cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        return [(32, 1024, 64)] if quick else [(32, 256, 16), (32, 1024, 64)]
    return [(32, 256, 16)] if quick else [(32, 256, 16), (32, 512, 32)]


def bench_batched(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    for B, n, rank in tqdm(batched_cases(device, quick), desc="batched rsvd", unit="shape"):
        M, s = known_spectrum(B, n, n, device, seed=1)
        l = rank + default_oversample(rank)
        fns = {
            "lk.rsvd batched": lambda: rsvd(M, rank, seed=0),
            "loop lk.rsvd": lambda: [rsvd(M[b], rank, seed=b) for b in range(B)],
            "loop torch.svd_lowrank": lambda: [torch.svd_lowrank(M[b], q=l, niter=2) for b in range(B)],
            "torch.svd_lowrank batched": lambda: torch.svd_lowrank(M, q=l, niter=2),
        }
        errors = {}
        for name, fn in fns.items():
            out = fn()
            if isinstance(out, list):
                U, S, V = (torch.stack(t) for t in zip(*out))
            else:
                U, S, V = out
            Vh = V.transpose(-1, -2) if "svd_lowrank" in name else V
            errors[name] = _error_ratio(M, s, U[..., :rank], S[..., :rank], Vh[..., :rank, :], rank)
        timings = harness.time_interleaved(fns, rounds=rounds, warmup=1, device=device)
        base = timings["loop torch.svd_lowrank"]["median_ms"]
        for name, t in timings.items():
            rows.append(dict(bench="batched_rsvd", batch=B, m=n, n=n, rank=rank, sketch=l, provider=name,
                             median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                             speedup_vs_loop_svd_lowrank=base / t["median_ms"], error_ratio=errors[name]))
    return rows


# ---- report ------------------------------------------------------------------------------------------------------

# The two SVD benchmarks' tables: first column, speed-up column (title, row key, decimals), error column.
_SVD_TABLES = {
    "rsvd": ("matrix", "speed-up vs `torch.linalg.svd`", "speedup_vs_linalg_svd", 1, "tail-energy error / optimal"),
    "batched_rsvd": ("batch × matrix", "speed-up vs loop of `svd_lowrank`", "speedup_vs_loop_svd_lowrank", 2,
                     "error / optimal"),
}


def markdown_tables(rows: list[dict]) -> str:
    """One Markdown table per benchmark that ran (covariance, plus the Triton triangle's rate on CUDA; rsvd;
    batched rsvd), separated by blank lines."""
    tables = []
    cov = [r for r in rows if r["bench"] == "covariance"]
    if cov:
        tables.append(harness.markdown_table(
            ["T", "K", "input", "provider", "median ms", "speed-up vs `X.float().T@X.float()`", "rel. error"],
            ([r["T"], r["K"], r["dtype"], r["provider"], f"{r['median_ms']:.2f}",
              f"{r['speedup_vs_float_matmul']:.2f}×", f"{r['rel_error']:.1e}"] for r in cov)))
        tri = [r for r in cov if "frac_of_matmul" in r]
        if tri:
            tables.append(harness.markdown_table(
                ["T", "K", "input", "Triton triangle TFLOP/s", "fraction of bf16 matmul rate"],
                ([r["T"], r["K"], r["dtype"], f"{r['triangle_tflops']:.1f}", f"{r['frac_of_matmul']:.2f}"]
                 for r in tri)))
    for bench, (first, speedup_title, speedup, digits, error_title) in _SVD_TABLES.items():
        sel = [r for r in rows if r["bench"] == bench]
        if sel:
            tables.append(harness.markdown_table(
                [first, "rank", "provider", "median ms", speedup_title, error_title],
                ([(f"{r['batch']} × " if "batch" in r else "") + f"{r['m']}×{r['n']}", r["rank"], r["provider"],
                  f"{r['median_ms']:.1f}", f"{r[speedup]:.{digits}f}×", f"{r['error_ratio']:.4f}"] for r in sel)))
    return "\n\n".join(tables)


def plot(rows: list[dict], path, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    cov = [dict(r, series=f"{r['provider']} [{r['dtype']}]") for r in rows if r["bench"] == "covariance"]
    if cov:
        harness.plot(cov, x="K", y="median_ms", group="series", ax=axes[0], logx=True, logy=True,
                     title=f"C += XᵀX, T = {cov[0]['T']} tokens", ylabel="median ms (lower is better)")
    sv = [dict(r, case=f"{r['m']}² r={r['rank']}") for r in rows if r["bench"] == "rsvd"]
    if sv:
        harness.plot(sv, x="case", y="median_ms", group="provider", ax=axes[1], kind="bar", logy=True,
                     title="top-k SVD (σᵢ = 1/i); labels: error / optimal", xlabel="", ylabel="median ms")
        for j, case in enumerate(dict.fromkeys(r["case"] for r in sv)):
            errs = ", ".join(f"{r['error_ratio']:.3f}" for r in sv if r["case"] == case)
            axes[1].annotate(errs, (j, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                             textcoords="offset points", fontsize=6)
    bt = [dict(r, case=f"{r['batch']}×{r['m']}² r={r['rank']}") for r in rows if r["bench"] == "batched_rsvd"]
    if bt:
        harness.plot(bt, x="case", y="median_ms", group="provider", ax=axes[2], kind="bar", logy=True,
                     title="batched vs looped randomized SVD", xlabel="", ylabel="median ms")
    env = harness.environment(device)
    fig.suptitle(f"calibration kernels on {env['device']} (torch {env['torch']}, commit {env['commit']})", fontsize=10)
    harness.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench_calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one or two shapes per benchmark, fewer rounds")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--only", nargs="*", choices=("covariance", "rsvd", "batched"), default=None,
                        help="run only these benchmarks")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per provider")
    parser.add_argument("--name", default="calibration", help="CSV/PNG base name")
    parser.add_argument("--out-dir", default=None,
                        help="where to write (default: $LORANULL_RESULTS or ~/.cache/loranull_kernels/results; "
                             "benchmarks/results rewrites a checkout's committed results)")
    args = parser.parse_args(argv)
    harness.check_out_dir(parser, args.out_dir)  # before any work, not after it

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and backend.interpreting():
        print("note: TRITON_INTERPRET is set; the CPU rows time the PyTorch paths only")
    rounds = args.rounds or (3 if args.quick else (5 if device.type == "cpu" else 10))
    only = set(args.only or ("covariance", "rsvd", "batched"))
    rows: list[dict] = []
    if "covariance" in only:
        rows += bench_covariance(device, args.quick, rounds)
    if "rsvd" in only:
        rows += bench_rsvd(device, args.quick, rounds)
    if "batched" in only:
        rows += bench_batched(device, args.quick, rounds)
    name = args.name + ("_quick" if args.quick else "")
    harness.finish(rows, name, device, markdown_tables(rows), args.out_dir,
                   lambda rows, path: plot(rows, path, device))
    return rows


if __name__ == "__main__":
    main()
