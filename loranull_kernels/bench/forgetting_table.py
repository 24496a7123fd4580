"""The forgetting benchmarks' summary (one row per method over its seeds), Markdown table and trade-off plot,
shared by the toy benchmark's report (:mod:`.forgetting_report`) and the real-model one
(:mod:`.llm_forgetting_report`), so both results read alike."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from . import harness

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
    """The results table of docs/benchmarks.md: target accuracy, retention, fact recall after, knowledge leak at
    init / after, task leak at init, learning rate, trainable parameters."""
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
