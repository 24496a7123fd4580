"""Microbenchmark of the fused LoRA linear against vanilla LoRA implementations.

Providers (docs/performance.md): ``frozen`` nn.Linear (the denominator: forward + dX only), ``naive`` PyTorch LoRA
(:func:`loranull_kernels.reference.lora_linear`: F.linear + F.dropout + two skinny linears), ``peft`` (a real HF
PEFT ``LoraLayer``, eager), ``lk-torch`` (our PyTorch backend) and ``lk-triton`` (our Triton kernels; GPU only: the
CPU interpreter is for testing, not timing). Modes: ``forward``, ``backward``, ``full`` (forward + backward).

``--base nf4`` runs the same providers over a bitsandbytes NF4 base (double-quantized, as QLoRA loads it):
``frozen`` is then the frozen ``Linear4bit``, ``naive`` dequantizes and runs the reference, ``peft`` is PEFT's own
``Linear4bit`` LoRA layer, ours take the packed weight (:class:`~loranull_kernels.ops.lora_linear.quantized_weight.
QuantizedWeight`).

Every provider's output and gradients are checked against the float64 reference (dropout 0) before timing. Each row
also records what the provider's autograd saves for the backward (``saved_mb``, any device) and, on CUDA, its peak
memory.
Providers alternate round by round; each ratio is reported as the median over the rounds with its min and max
(a round times every provider back to back, so a busy machine widens the spread instead of biasing one provider).
Results: a CSV (device, versions, date and commit in each row) and a PNG plot in ``--out-dir`` (default
``~/.cache/loranull_kernels/results``, or ``$LORANULL_RESULTS``), and a table of ratios printed to stdout.

    loranull-bench                 # CPU: M = 1024 and 4096, K = N = 1024, r = 16 and 64, fp32; GPU: the full sweep
    loranull-bench --quick         # one shape, fewer repetitions (the main job's default)
    loranull-bench --out-dir benchmarks/results    # rewrite the committed results of a checkout
    loranull-bench --base nf4      # the same over a 4-bit (QLoRA) base: needs bitsandbytes (the quant extra)
"""
from __future__ import annotations

import argparse
import itertools
import math
import re
from dataclasses import dataclass

import torch

from .. import _cli
from .. import backend as lk_backend
from .. import reference
from ..ops.lora_linear import lora_linear
from . import harness

PROVIDERS = ("frozen", "naive", "peft", "lk-torch", "lk-triton")
MODES = ("forward", "backward", "full")
BASES = ("dense", "nf4")


@dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    r: int
    dropout: float
    dtype: torch.dtype
    base: str = "dense"

    def label(self) -> str:
        return (f"M={self.M} K={self.K} N={self.N} r={self.r} p={self.dropout} {str(self.dtype).replace('torch.', '')}"
                + ("" if self.base == "dense" else f" base={self.base}"))


def _base_layer(weight, bias, case: Case) -> torch.nn.Module:
    """The frozen base layer holding ``weight``: an ``nn.Linear``, or for ``base="nf4"`` a bitsandbytes
    ``Linear4bit`` (NF4, double-quantized, computing in the case's dtype) quantized from it."""
    N, K = weight.shape
    if case.base == "dense":
        layer = torch.nn.Linear(K, N, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    else:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(K, N, bias=bias is not None, compute_dtype=case.dtype, compress_statistics=True,
                                  quant_type="nf4")
        layer.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU inference layout: docs/design.md
    with torch.no_grad():
        layer.weight.data = weight.detach().clone() if case.base == "dense" else weight.detach().cpu().clone()
        if bias is not None:
            layer.bias.data = bias.detach().clone()
    return layer.to(weight.device).requires_grad_(False)


def _peft_layer(base_layer, A, B, case: Case):
    """A real PEFT LoRA layer (``lora.Linear``, or PEFT's bitsandbytes ``Linear4bit``) around ``base_layer``, with
    our A/B copied in (None without peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    holder = torch.nn.Sequential()
    holder.add_module("proj", base_layer)
    holder.is_loaded_in_4bit = case.base == "nf4"  # how PEFT picks its bitsandbytes layer (as for an HF model)
    cfg = LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout, target_modules=["proj"])
    model = get_peft_model(holder, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    model.train()
    return model


def make_providers(case: Case, device: torch.device, generator_seed: int = 0):
    """Return ``{name: (fn(x) -> y, params)}`` for the providers that can run here, plus the shared inputs."""
    g = torch.Generator(device="cpu").manual_seed(generator_seed)
    K, N, r, dt = case.K, case.N, case.r, case.dtype
    weight = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device, dt)
    bias = torch.randn(N, generator=g).to(device, dt)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device, dt)
    B = (torch.randn(N, r, generator=g) * 0.02).to(device, dt)  # nonzero: a trained adapter, not the B = 0 init
    scaling = 2.0
    providers = {}

    linear = _base_layer(weight, bias, case)
    providers["frozen"] = (linear, [])
    peft_model = _peft_layer(_base_layer(weight, bias, case), A, B, case)  # its own copy of the base
    if case.base == "dense":
        base = weight
    else:
        from ..base_weights import base_weight

        base = base_weight(linear).quantized()  # the packed NF4 weight, read in place
        weight = base.dequantize(dt)  # what the base computes: the reference's weight from here on

    nA, nB = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    if case.base == "dense":
        providers["naive"] = (lambda x: reference.lora_linear(x, weight, nA, nB, scaling, bias=bias,
                                                              dropout_p=case.dropout), [nA, nB])
    else:  # dequantize, then plain PyTorch LoRA: what a QLoRA layer without a fused kernel does
        providers["naive"] = (lambda x: reference.lora_linear(x, base.dequantize(dt), nA, nB, scaling, bias=bias,
                                                              dropout_p=case.dropout), [nA, nB])

    if peft_model is not None:
        providers["peft"] = (peft_model, [p for p in peft_model.parameters() if p.requires_grad])

    for name in ("torch", "triton"):
        if name == "triton" and (device.type != "cuda" or lk_backend.triton_unusable_reason(device, dt)):
            continue
        lA, lB = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

        def fn(x, lA=lA, lB=lB, name=name):
            with lk_backend.use(name):
                return lora_linear(x, base, lA, lB, scaling, bias=bias, dropout_p=case.dropout)

        providers[f"lk-{name}"] = (fn, [lA, lB])
    return providers, (weight, bias, A, B, scaling)


def check_providers(providers, inputs, case: Case, device: torch.device) -> None:
    """Each LoRA provider must match the float64 reference at dropout 0 (forward and dA, dB, dx) before timing."""
    weight, bias, A, B, scaling = inputs
    if case.dropout > 0:
        return  # masks differ between providers; correctness at p > 0 is the test suite's job
    M = min(case.M, 256)
    x = torch.randn(M, case.K, device=device, dtype=case.dtype)
    dy = torch.randn(M, case.N, device=device, dtype=case.dtype)
    x64 = x.double().requires_grad_(True)
    A64, B64 = A.double().requires_grad_(True), B.double().requires_grad_(True)
    y64 = reference.lora_linear(x64, weight.double(), A64, B64, scaling, bias=bias.double())
    y64.backward(dy.double())
    frozen64 = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    tol = 1e-3 if case.dtype == torch.float32 else 5e-2

    def check(name, what, got, want):
        err = (got.double() - want).abs().max().item()
        if err > tol * max(1.0, want.abs().max().item()):
            raise AssertionError(f"{name}: {what} differs from the reference by {err:.3e} at {case.label()}")

    for name, (fn, params) in providers.items():
        xi = x.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        y = fn(xi)
        y.backward(dy)
        if name == "frozen":
            check(name, "output", y, frozen64)
            continue
        check(name, "output", y, y64)
        check(name, "dx", xi.grad, x64.grad)
        grads = sorted((p.grad for p in params), key=lambda t: t.shape != A.shape)  # A-shaped first
        for what, got, want in zip(("dA", "dB"), grads, (A64.grad, B64.grad)):
            check(name, what, got, want)


def _closures(fn, params, x, dy, mode):
    def zero():
        x.grad = None
        for p in params:
            p.grad = None

    if mode == "forward":
        return lambda: fn(x)
    if mode == "full":
        def full():
            zero()
            fn(x).backward(dy)
        return full
    y = fn(x)  # backward alone: replay the same graph

    def bwd():
        zero()
        y.backward(dy, retain_graph=True)
    return bwd


def run_case(case: Case, device: torch.device, rounds: int, warmup: int) -> list[dict]:
    providers, inputs = make_providers(case, device)
    check_providers(providers, inputs, case, device)
    x = torch.randn(case.M, case.K, device=device, dtype=case.dtype, requires_grad=True)
    dy = torch.randn(case.M, case.N, device=device, dtype=case.dtype)
    rows = []
    for mode in MODES:
        fns = {name: _closures(fn, params, x, dy, mode) for name, (fn, params) in providers.items()}
        timings = harness.time_interleaved(fns, rounds=rounds, warmup=warmup, device=device)
        peaks = _peak_memory(providers, x, dy, device) if mode == "full" and device.type == "cuda" else {}
        saved = _saved_bytes(providers, x) if mode == "full" else {}
        predicted = _predicted_ratio(case, device, mode)
        for name, t in timings.items():
            ratio = harness.ratio_spread(t, timings["frozen"])
            vs_peft = harness.ratio_spread(timings["peft"], t) if "peft" in timings else {}
            rows.append(dict(op="lora_linear", M=case.M, K=case.K, N=case.N, r=case.r, dropout=case.dropout,
                             dtype=str(case.dtype).replace("torch.", ""), base=case.base, provider=name, mode=mode,
                             rounds=rounds,
                             median_ms=t["median_ms"], min_ms=t["min_ms"], max_ms=t["max_ms"], p20_ms=t["p20_ms"],
                             p80_ms=t["p80_ms"], ratio_to_frozen=ratio["median"], ratio_min=ratio["min"],
                             ratio_max=ratio["max"], peft_over_this=vs_peft.get("median", float("nan")),
                             peft_over_this_min=vs_peft.get("min", float("nan")),
                             peft_over_this_max=vs_peft.get("max", float("nan")),
                             peak_mem_mb=peaks.get(name, float("nan")),
                             saved_mb=saved.get(name, float("nan")),
                             roofline_ratio=predicted if name == "lk-triton" else float("nan")))
    return rows


def _predicted_ratio(case: Case, device: torch.device, mode: str) -> float:
    """The roofline model's ratio of our Triton fwd+bwd to the frozen layer (:mod:`.roofline`), on GPUs whose peak
    rates it knows; NaN elsewhere (the CPU runs the torch backend, which the model does not describe)."""
    if device.type != "cuda" or mode != "full":
        return float("nan")
    from . import roofline

    rates = roofline.device_for(torch.cuda.get_device_name(device))
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(case.dtype)
    if rates is None or dtype is None:
        return float("nan")
    return roofline.predict(case.M, case.K, case.N, case.r, dtype=dtype, dropout=case.dropout, features=("bias",),
                            device=rates).ratio  # make_providers gives every layer a bias


def _saved_bytes(providers, x) -> dict:
    """MiB of the tensors each provider's autograd keeps for its backward (counted once per storage; x, which the
    caller holds anyway, and the parameters excluded): where a dense copy of a quantized base would show."""
    out = {}
    for name, (fn, params) in providers.items():
        seen: dict[tuple, int] = {}
        own = {t.untyped_storage().data_ptr() for t in [x, *params]}

        def pack(t):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = (t.untyped_storage().data_ptr(), t.device)
                if key[0] not in own:
                    seen[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        out[name] = sum(seen.values()) / 2**20
    return out


def _peak_memory(providers, x, dy, device) -> dict:
    out = {}
    for name, (fn, params) in providers.items():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn(x).backward(dy)
        torch.cuda.synchronize(device)
        out[name] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        x.grad = None
        for p in params:
            p.grad = None
    return out


def default_cases(device: torch.device, quick: bool, base: str = "dense") -> list[Case]:
    """The sweep: the reference shape (quick), or the full grid; an NF4 base runs the reference shape only."""
    if device.type == "cuda":
        dt = torch.bfloat16
        if quick or base != "dense":
            return [Case(8192, 4096, 4096, 16, p, dt, base) for p in (0.0, 0.1)]
        return [Case(M, K, N, r, p, dt) for M, (K, N), r, p in itertools.product(
            (512, 2048, 8192, 16384), ((4096, 4096), (4096, 11008), (11008, 4096)), (8, 16, 64, 128), (0.0, 0.1))]
    dt = torch.float32
    if quick or base != "dense":
        return [Case(4096, 1024, 1024, 16, p, dt, base) for p in (0.0, 0.1)]
    return [Case(M, 1024, 1024, r, p, dt) for M, r, p in itertools.product((1024, 4096), (16, 64), (0.0, 0.1))]


def _spread(median: float, lo: float, hi: float) -> str:
    return f"{median:.2f} [{lo:.2f}-{hi:.2f}]"


def table(rows: list[dict]) -> str:
    """The fwd+bwd ratios to the frozen layer, median [min-max] over the interleaved rounds, and our speed-up over
    HF PEFT (PEFT time / ours, per round) for the fastest of our backends."""
    full = [r for r in rows if r["mode"] == "full"]
    cases = sorted({(r["M"], r["K"], r["N"], r["r"], r["dropout"], r["dtype"]) for r in full})
    names = [p for p in PROVIDERS if p != "frozen" and any(r["provider"] == p for r in full)]
    rounds = max((r["rounds"] for r in full), default=0)
    roofline = any(not math.isnan(r.get("roofline_ratio", math.nan)) for r in full)
    bases = {r.get("base", "dense") for r in full}
    frozen = "nn.Linear" if bases <= {"dense"} else "bitsandbytes NF4 Linear4bit" if bases == {"nf4"} else "base"
    lines = [f"fwd+bwd time / frozen {frozen} fwd+bwd: median [min-max] over {rounds} interleaved rounds "
             "(lower is better)" + ("; roofline: the model's prediction for lk-triton" if roofline else ""),
             f"{'M':>6} {'K':>6} {'N':>6} {'r':>4} {'p':>4} " + " ".join(f"{n:>18}" for n in names)
             + f" {'peft / lk':>18}" + (f" {'roofline':>9}" if roofline else "")]
    for c in cases:
        sel = {r["provider"]: r for r in full if (r["M"], r["K"], r["N"], r["r"], r["dropout"], r["dtype"]) == c}
        ours = min((sel[n] for n in ("lk-triton", "lk-torch") if n in sel), key=lambda r: r["median_ms"], default=None)
        speedup = (_spread(ours["peft_over_this"], ours["peft_over_this_min"], ours["peft_over_this_max"])
                   if ours is not None and "peft" in sel else "-")
        lines.append(f"{c[0]:>6} {c[1]:>6} {c[2]:>6} {c[3]:>4} {c[4]:>4} "
                     + " ".join(f"{_spread(sel[n]['ratio_to_frozen'], sel[n]['ratio_min'], sel[n]['ratio_max']):>18}"
                                for n in names) + f" {speedup:>18}"
                     + (f" {sel['lk-triton']['roofline_ratio']:>9.3f}" if roofline and "lk-triton" in sel else ""))
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    print("\n" + table(rows))


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["mode"] == "full"]
    cases = sorted({(r["M"], r["K"], r["N"], r["r"], r["dropout"]) for r in full})
    names = [p for p in PROVIDERS if p != "frozen" and any(r["provider"] == p for r in full)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) + 2), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [next((r["ratio_to_frozen"] for r in full if r["provider"] == name
                      and (r["M"], r["K"], r["N"], r["r"], r["dropout"]) == c), float("nan")) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"M={c[0]}\nK={c[1]} N={c[2]}\nr={c[3]} p={c[4]}" for c in cases], fontsize=7)
    ax.set_ylabel("fwd+bwd time / frozen " + ("nn.Linear" if full[0].get("base", "dense") == "dense"
                                              else f"{full[0]['base'].upper()} base"))
    env = harness.environment()
    ax.set_title(f"LoRA linear on {env['device']} ({full[0]['dtype']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser("loranull-bench", _cli.plain(__doc__))
    p.add_argument("--quick", action="store_true", help="one shape (dropout 0 and 0.1), fewer repetitions")
    p.add_argument("--device", type=_cli.device, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--M", type=_cli.positive_int, nargs="+", help="token counts (overrides the default sweep)")
    p.add_argument("--K", type=_cli.positive_int, default=None, help="in_features (with --M)")
    p.add_argument("--N", type=_cli.positive_int, default=None, help="out_features (with --M)")
    p.add_argument("--r", type=_cli.positive_int, nargs="+", default=[16], help="ranks (with --M)")
    p.add_argument("--dropout", type=_cli.probability, nargs="+", default=[0.0, 0.1],
                   help="dropout values in [0, 1) (with --M)")
    p.add_argument("--rounds", type=_cli.positive_int, default=None, help="timed rounds per provider (≥ 1)")
    p.add_argument("--base", choices=BASES, default="dense",
                   help="the frozen base: a dense nn.Linear, or a bitsandbytes NF4 Linear4bit (QLoRA; needs "
                        "bitsandbytes: pip install 'loranull-kernels[quant]')")
    p.add_argument("--name", default="lora_linear", help="CSV/PNG base name")
    p.add_argument("--out-dir", default=None,
                   help="where to write the CSV and PNG (default: $LORANULL_RESULTS or ~/.cache/loranull_kernels/"
                        "results; benchmarks/results rewrites a checkout's committed results)")
    return p


def main(argv=None) -> list[dict]:
    """Run the benchmark, write its CSV and PNG, print the table; returns the rows. Bad arguments: exit status 2."""
    p = parser()
    args = p.parse_args(argv)
    for flag in ("K", "N", "r", "dropout"):
        if not args.M and getattr(args, flag) != p.get_default(flag):
            p.error(f"--{flag} needs --M (it changes the shapes of a custom sweep)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        p.error(f"--name {args.name!r}: use letters, digits, '_', '-' or '.' (it becomes a file name)")
    harness.check_out_dir(p, args.out_dir)

    if args.base != "dense":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            p.error(f"--base {args.base} needs bitsandbytes: pip install 'loranull-kernels[quant]'")
    device = args.device or _cli.default_device()
    if args.M:
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        K = args.K or (4096 if device.type == "cuda" else 1024)
        cases = [Case(M, K, args.N or K, r, p, dt, args.base)
                 for M, r, p in itertools.product(args.M, args.r, args.dropout)]
    else:
        cases = default_cases(device, args.quick, args.base)
    rounds = args.rounds or (7 if args.quick else 15)
    warmup = 2 if device.type == "cpu" else 10

    from tqdm.auto import tqdm

    rows = []
    for case in tqdm(cases, desc="lora_linear benchmark", unit="shape"):
        rows.extend(run_case(case, device, rounds=rounds, warmup=warmup))
    name = args.name + ("" if args.base == "dense" else f"_{args.base}") + ("_quick" if args.quick and not args.M else "")
    csv_path, png_path = (harness.results_path(name, ext, device, args.out_dir) for ext in ("csv", "png"))
    harness.write_csv(rows, csv_path, device)
    plot(rows, png_path)
    print_table(rows)
    print(f"\nwrote {csv_path} and {png_path}")
    return rows


cli = _cli.console_script(main, "loranull-bench")


if __name__ == "__main__":
    raise SystemExit(cli())
