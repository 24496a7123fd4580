"""Whole-model LoRA-Null calibration benchmark (issue 14): real Llama layer sizes, memory against the block count.

1. ``layers``: one Llama-shaped block with real sizes (hidden 4096; intermediate 11008 = Llama-2-7B and 14336 =
   Llama-3-8B; random weights and tokens) on this device. For each distinct layer input (attention input, o_proj,
   MLP input, down_proj) the covariance over ``--tokens`` tokens and the null-space solve
   (``smallest_eigenvectors``, ``method="auto"``); for each of the seven projections the LoRA-Null init (SVD of
   ``W Q`` and the base rewrite). Seconds per item, and per block.
2. ``memory``: peak resident memory *added by* ``lk.inject`` (peak RSS during the call minus RSS before it, each
   configuration in a fresh process) for a smaller Llama shape (hidden 1024, intermediate 2816) with 2, 4 and 8
   blocks, one pass vs block by block, with glibc's default allocator and with a fixed mmap threshold (see
   :data:`ALLOCATORS`). One pass holds every block's covariances, so it grows with the block count; block by
   block holds one block's. ``inject`` keeps the replaced layers until it returns (its rollback), which adds the
   targeted weights in both modes; ``--not-transactional`` measures ``inject(transactional=False)``.
3. ``projection``: per-block seconds and bytes from (1), scaled to 7B / 8B / 70B configurations: covariance time
   linear in tokens, solve time by n³ for sizes not measured (70B's 8192 and 28672), covariance memory exact.

Run ``python benchmarks/bench_calibration_model.py [--only layers memory] [--out-dir benchmarks/results]`` from a
checkout (the package installed). Writes ``calibration_model_{device}.csv`` and ``.png`` to ``--out-dir`` (default:
``$LORANULL_RESULTS`` or ``~/.cache/loranull_kernels/results``) and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from loranull_kernels.bench import harness

CONFIGS = {  # name: hidden, intermediate, blocks
    "Llama-2-7B": (4096, 11008, 32),
    "Llama-3-8B": (4096, 14336, 32),
    "Llama-3-70B": (8192, 28672, 80),
}
# Distinct inputs of a Llama block: (name, which size) — q/k/v share one, gate/up another.
INPUTS = (("attn_in (q,k,v)", "hidden"), ("o_proj", "hidden"), ("mlp_in (gate,up)", "hidden"), ("down_proj", "inter"))
LAYERS = (("q_proj", "attn_in (q,k,v)"), ("k_proj", "attn_in (q,k,v)"), ("v_proj", "attn_in (q,k,v)"),
          ("o_proj", "o_proj"), ("gate_proj", "mlp_in (gate,up)"), ("up_proj", "mlp_in (gate,up)"),
          ("down_proj", "down_proj"))


def llama(hidden: int, inter: int, blocks: int, heads: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)
    return tf.LlamaForCausalLM(cfg).eval()


def token_batches(n_batches: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (batch, seq), generator=g)} for _ in range(n_batches)]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---- 1. layers ---------------------------------------------------------------------------------------------------

def bench_layers(hidden: int, inter: int, tokens: int, r: int) -> list[dict]:
    from loranull_kernels import nullspace
    from loranull_kernels.config import AdapterConfig
    from loranull_kernels.covariance_accumulator import CovarianceAccumulator
    from loranull_kernels.methods import lora_null

    warm = torch.eye(300) + 0.01  # first-call overheads (thread pools, LAPACK init) out of the timings
    for method in ("randomized", "eigh"):
        nullspace.smallest_eigenvectors(warm, 8, method=method)
    model = llama(hidden, inter, 1, heads=hidden // 128)
    block = model.model.layers[0]
    mods = {"attn_in (q,k,v)": block.self_attn.q_proj, "o_proj": block.self_attn.o_proj,
            "mlp_in (gate,up)": block.mlp.gate_proj, "down_proj": block.mlp.down_proj}
    seen: dict[str, list] = {k: [] for k in mods}
    hooks = [m.register_forward_pre_hook(lambda mod, a, k=k: seen[k].append(a[0].detach()))
             for k, m in mods.items()]
    with torch.no_grad():
        for batch in token_batches(max(1, tokens // 512), 1, min(tokens, 512)):
            model(**batch)
    for h in hooks:
        h.remove()
    cfg = AdapterConfig(method="lora_null", r=r, alpha=2 * r)
    rows, covs = [], {}
    size = {"hidden": hidden, "inter": inter}
    for name, which in INPUTS:
        n = size[which]
        acc = CovarianceAccumulator(n)
        _, cov_s = _timed(lambda: [acc.update(x) for x in seen[name]])
        C = acc.mean()
        seen[name] = None
        method = nullspace.pick_method(n, r)
        (values, Q), solve_s = _timed(lambda: nullspace.smallest_eigenvectors(C, r))
        covs[name] = (C, values, Q)
        rows.append(dict(bench="layers", hidden=hidden, inter=inter, item=name, n=n, tokens=acc.tokens, r=r,
                         covariance_s=cov_s, solve_s=solve_s, solver=method, init_s=0.0,
                         covariance_bytes=4 * n * n))
        print(f"  {name}: n={n} covariance {cov_s:.2f} s, solve ({method}) {solve_s:.2f} s", flush=True)
    for layer, name in LAYERS:
        W = getattr(block.self_attn if "proj" in layer and layer[0] in "qkvo" else block.mlp, layer).weight.detach()
        C, values, Q = covs[name]
        with nullspace.precomputed([(C, values, Q)]):
            _, init_s = _timed(lambda: lora_null.initialize(W, r, cfg.scaling, cfg, covariance=C))
        rows.append(dict(bench="layers", hidden=hidden, inter=inter, item=layer, n=W.shape[1], tokens=0, r=r,
                         covariance_s=0.0, solve_s=0.0, solver="", init_s=init_s, covariance_bytes=0))
    del model
    return rows


def per_block(rows: list[dict], hidden: int, inter: int) -> dict:
    mine = [r for r in rows if r["bench"] == "layers" and r["hidden"] == hidden and r["inter"] == inter]
    tokens = max(r["tokens"] for r in mine)
    return dict(tokens=tokens, covariance_s=sum(r["covariance_s"] for r in mine),
                solve=[(r["n"], r["solve_s"]) for r in mine if r["solver"]],
                init_s=sum(r["init_s"] for r in mine), covariance_bytes=sum(r["covariance_bytes"] for r in mine))


# ---- 2. memory ---------------------------------------------------------------------------------------------------


def memory_child(mode: str, blocks: int, hidden: int, inter: int, r: int, transactional: bool = True) -> dict:
    """In a fresh process: the peak RSS that ``lk.inject`` adds (VmHWM reset through /proc/self/clear_refs).
    ``transactional``: inject's own argument (True keeps the replaced layers until it returns, for its rollback)."""
    import gc

    from loranull_kernels.config import AdapterConfig
    from loranull_kernels.inject import inject

    model = llama(hidden, inter, blocks, heads=hidden // 128)
    data = token_batches(8, 2, 256, seed=1)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    before = harness.rss_kib("VmRSS")
    t0 = time.perf_counter()
    inject(model, AdapterConfig(method="lora_null", r=r), calibration_data=data, progress=False,
           calibration_mode=mode, transactional=transactional)
    seconds = time.perf_counter() - t0
    peak = harness.rss_kib("VmHWM")
    return dict(bench="memory", mode=mode, blocks=blocks, hidden=hidden, inter=inter, r=r, tokens=8 * 2 * 256,
                transactional=transactional, rss_before_mib=before / 1024, peak_added_mib=(peak - before) / 1024,
                seconds=seconds)


# glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after which blocks of
# that size come from the heap and may be kept by the process when freed: RSS then also counts memory Python has
# released, which makes it noisy (no replaced layer stays alive during sequential calibration: checked with weak
# references). A fixed threshold returns freed large blocks to the system, so RSS follows live memory. Both are
# measured.
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=128K": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def bench_memory(blocks_list, hidden: int, inter: int, r: int, transactional: bool = True) -> list[dict]:
    rows = []
    for allocator, env in ALLOCATORS.items():
        for blocks in blocks_list:
            for mode in ("sequential", "one_pass"):
                cmd = [sys.executable, __file__, "--memory-child", mode, str(blocks), str(hidden), str(inter), str(r),
                       str(int(transactional))]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
                row = {**json.loads(out.stdout.strip().splitlines()[-1]), "allocator": allocator}
                print(f"  {allocator}: {mode} {blocks} blocks: +{row['peak_added_mib']:.0f} MiB peak, "
                      f"{row['seconds']:.1f} s", flush=True)
                rows.append(row)
    for allocator in ALLOCATORS:
        for mode in ("sequential", "one_pass"):
            mine = sorted((r for r in rows if r["mode"] == mode and r["allocator"] == allocator),
                          key=lambda r: r["blocks"])
            for row in mine:
                row["growth_vs_fewest_blocks"] = row["peak_added_mib"] / mine[0]["peak_added_mib"]
    return rows


# ---- 3. projection -----------------------------------------------------------------------------------------------

def project(rows: list[dict], tokens: int) -> list[dict]:
    """7B / 8B / 70B from the measured per-block figures (see the module docstring)."""
    measured = {(r["hidden"], r["inter"]) for r in rows if r["bench"] == "layers"}
    if not measured:
        return []
    solves = {}
    cov_rate = []  # seconds per token per n² (the covariance is a GEMM: linear in tokens and in n²)
    init_rate = []
    for h, i in measured:
        b = per_block(rows, h, i)
        solves.update(dict(b["solve"]))
        n2 = 3 * h * h + i * i
        cov_rate.append(b["covariance_s"] / (b["tokens"] * n2))
        init_rate.append(b["init_s"] / (4 * h * h + 3 * h * i))
    cov_rate, init_rate = sum(cov_rate) / len(cov_rate), sum(init_rate) / len(init_rate)

    def solve_s(n):
        if n in solves:
            return solves[n], True
        ref = max(solves)  # the largest measured size, scaled by n³
        return solves[ref] * (n / ref) ** 3, False

    out = []
    for name, (h, i, blocks) in CONFIGS.items():
        sh, mh = solve_s(h)
        si, mi = solve_s(i)
        block_s = cov_rate * tokens * (3 * h * h + i * i) + 3 * sh + si + init_rate * (4 * h * h + 3 * h * i)
        cov_block = 4 * (3 * h * h + i * i)
        out.append(dict(bench="projection", config=name, hidden=h, inter=i, blocks=blocks, tokens=tokens,
                        solve_measured=mh and mi, block_s=block_s, model_h=block_s * blocks / 3600,
                        one_pass_cov_gib=blocks * cov_block / 2**30,
                        sequential_cov_gib=(cov_block + 2 * 8 * i * i) / 2**30,
                        hidden_states_bf16_gib=tokens * h * 2 / 2**30))
    return out


# ---- report ------------------------------------------------------------------------------------------------------

def markdown(rows: list[dict]) -> str:
    """One Markdown table per part that ran (layers, memory, projection), separated by blank lines."""
    tables = []
    lay = [r for r in rows if r["bench"] == "layers"]
    if lay:
        tables.append(harness.markdown_table(
            ["hidden / inter", "item", "n", "tokens", "covariance s", "solve s (solver)", "init s"],
            ([f"{r['hidden']} / {r['inter']}", r["item"], r["n"], r["tokens"] or "",
              f"{r['covariance_s']:.2f}" if r["tokens"] else "",
              f"{r['solve_s']:.2f} ({r['solver']})" if r["solver"] else "",
              f"{r['init_s']:.2f}" if r["init_s"] else ""] for r in lay)))
    mem = [r for r in rows if r["bench"] == "memory"]
    if mem:
        tables.append(harness.markdown_table(
            ["allocator", "mode", "blocks", "peak RSS added by inject (MiB)", "× 2 blocks'", "seconds"],
            ([r["allocator"], r["mode"], r["blocks"], f"{r['peak_added_mib']:.0f}",
              f"{r['growth_vs_fewest_blocks']:.2f}", f"{r['seconds']:.1f}"]
             for r in sorted(mem, key=lambda r: (r["allocator"], r["mode"], r["blocks"])))))
    proj = [r for r in rows if r["bench"] == "projection"]
    if proj:
        star = lambda r: "" if r["solve_measured"] else " *"  # noqa: E731
        tables.append(harness.markdown_table(
            ["config", "blocks", "s / block", "model (h)", "one-pass covariances (GiB)",
             "sequential: covariances + solver (GiB)", "hidden states, bf16 (GiB)"],
            ([r["config"], r["blocks"], f"{r['block_s']:.0f}{star(r)}", f"{r['model_h']:.2f}{star(r)}",
              f"{r['one_pass_cov_gib']:.1f}", f"{r['sequential_cov_gib']:.2f}", f"{r['hidden_states_bf16_gib']:.2f}"]
             for r in proj)))
    return "\n\n".join(tables)


def plot(rows: list[dict], path) -> None:
    mem = [r for r in rows if r["bench"] == "memory"]
    if not mem:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for allocator, style in zip(ALLOCATORS, ("-", "--")):
        for mode in ("one_pass", "sequential"):
            pts = sorted((r["blocks"], r["peak_added_mib"]) for r in mem
                         if r["mode"] == mode and r["allocator"] == allocator)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{mode} ({allocator})")
    ax.set_xlabel("blocks")
    ax.set_ylabel("peak RSS added by inject (MiB)")
    ax.set_title(f"LoRA-Null calibration memory, hidden {mem[0]['hidden']}", fontsize=9)
    ax.legend(fontsize=7)
    harness.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-child":
        mode, blocks, hidden, inter, r = argv[1], *(int(v) for v in argv[2:6])
        transactional = argv[6] != "0" if len(argv) > 6 else True
        print(json.dumps(memory_child(mode, blocks, hidden, inter, r, transactional)))
        return []
    parser = argparse.ArgumentParser(prog="bench_calibration_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=("layers", "memory"), default=None)
    parser.add_argument("--sizes", nargs="*", default=["4096x11008", "4096x14336"], help="HIDDENxINTER of (1)")
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens of (1)")
    parser.add_argument("--r", type=int, default=128, help="null-space dimension of (1)")
    parser.add_argument("--blocks", nargs="*", type=int, default=[2, 4, 8], help="block counts of (2)")
    parser.add_argument("--memory-shape", default="1024x2816", help="HIDDENxINTER of (2)")
    parser.add_argument("--not-transactional", action="store_true",
                        help="(2) with inject(transactional=False): each replaced layer freed at once")
    parser.add_argument("--project-tokens", type=int, default=256 * 2048, help="calibration tokens of (3)")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--name", default="calibration_model")
    args = parser.parse_args(argv)
    harness.check_out_dir(parser, args.out_dir)  # before any work, not after it
    only = set(args.only or ("layers", "memory"))
    rows: list[dict] = []
    if "layers" in only:
        for spec in args.sizes:
            h, i = (int(v) for v in spec.split("x"))
            print(f"layers: hidden {h}, intermediate {i}", flush=True)
            rows += bench_layers(h, i, args.tokens, args.r)
        rows += project(rows, args.project_tokens)
    if "memory" in only:
        h, i = (int(v) for v in args.memory_shape.split("x"))
        print(f"memory: hidden {h}, intermediate {i}", flush=True)
        rows += bench_memory(args.blocks, h, i, r=16, transactional=not args.not_transactional)
    harness.finish(rows, args.name, torch.device("cpu"), markdown(rows), args.out_dir, plot)
    return rows


if __name__ == "__main__":
    main()
