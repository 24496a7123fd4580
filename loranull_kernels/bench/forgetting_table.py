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
                   seeds=len(sel), trainable=sel[0]["trainable"], recall_before=sel[0]["recall_before"],
                   refused=sel[0].get("refused") or "", peft_fused=sel[0].get("peft_fused") or "")
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
        if r.get("refused"):
            lines.append(f"| {r['method']} | refused by PEFT: {r['refused']} | | | | | | |")
            continue
        leak = ("–" if math.isnan(r["leak_init_mean"])
                else f"{r['leak_init_mean']:.3f} → {r['leak_final_mean']:.3f}")
        task_leak = r.get("task_leak_init_mean", math.nan)
        task_leak = "–" if task_leak is None or math.isnan(task_leak) else f"{task_leak:.3f}"
        lines.append(f"| {r['method']} | {r['lr']:g} | {_pct(r['target_accuracy_mean'], r['target_accuracy_std'])} | "
                     f"{_pct(r['retention_mean'], r['retention_std'])} | "
                     f"{_pct(r['recall_after_mean'], r['recall_after_std'])} | {leak} | {task_leak} | {r['trainable']:,} |")
    return "\n".join(lines)


def fronts(runs: list[dict]) -> dict[str, list[dict]]:
    """Each swept method's front: its first seed's runs over the whole learning-rate grid, by rate (the runs of the
    protocol's phase 1; LaLoRA and its control run at LoRA's rate and have none). Refused runs are left out."""
    swept = [r for r in runs if r["family"] not in ("lalora", "l2") and not r.get("refused")]
    out: dict[str, list[dict]] = {}
    for name in dict.fromkeys(r["method"] for r in swept):
        mine = [r for r in swept if r["method"] == name]
        first = min(r["seed"] for r in mine)
        rates = sorted({r["lr"] for r in mine if r["seed"] == first})
        if len(rates) > 1:
            out[name] = sorted((r for r in mine if r["seed"] == first), key=lambda r: r["lr"])
    return out


def front_table(runs: list[dict]) -> str:
    """The fronts (:func:`fronts`) as a Markdown table: one row per method, one column per learning rate of the
    grid, each cell ``test accuracy / retention`` in %, the selected rate in bold."""
    rows = fronts(runs)
    rates = sorted({r["lr"] for front in rows.values() for r in front})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for name, front in rows.items():
        at = {r["lr"]: r for r in front}
        cells = []
        for lr in rates:
            r = at.get(lr)
            cell = "" if r is None else f"{100 * r['target_accuracy']:.0f} / {100 * r['retention']:.1f}"
            cells.append(f"**{cell}**" if r is not None and r.get("selected") else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], runs: list[dict], path, title: str = "") -> Path:
    """Two panels of retention against target accuracy. Left: one point per method at its selected learning rate
    (error bars: ± std over seeds), LaLoRA's λ sweep as a curve starting at LoRA (λ = 0). Right: each method's
    front over the learning-rate grid (:func:`fronts`), which shows the rate where it starts to forget. PEFT's
    rows (family ``peft``) are drawn hollow and dashed; refused rows are absent (the table says why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [r for r in summary if not r.get("refused")]
    fig, (ax, fx) = plt.subplots(1, 2, figsize=(14, 6.5))
    palette = plt.get_cmap("tab20")
    names = [r["method"] for r in summary if r["family"] != "lalora"] + ["lalora"]
    color = {n: palette(i % 20) for i, n in enumerate(names)}
    color.update({r["method"]: color["lalora"] for r in summary if r["family"] == "lalora"})
    markers = {"lora_null v1": "s", "lora_null v2": "D", "full fine-tuning": "*"}
    markers.update({r["method"]: "X" for r in summary if r["family"] == "l2"})
    peft = {r["method"] for r in summary if r["family"] == "peft"}
    for r in summary:
        if r["family"] == "lalora":
            continue
        ax.errorbar(100 * r["target_accuracy_mean"], 100 * r["retention_mean"], xerr=100 * r["target_accuracy_std"],
                    yerr=100 * r["retention_std"], fmt=markers.get(r["method"], "o"), ms=8, capsize=3,
                    color=color[r["method"]], mfc="none" if r["method"] in peft else color[r["method"]],
                    label=f"{r['method']} (lr {r['lr']:g})")
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
    for name, front in fronts(runs).items():
        if name not in color:
            continue
        fx.plot([100 * r["target_accuracy"] for r in front], [100 * r["retention"] for r in front],
                "--" if name in peft else "-", marker=markers.get(name, "o"), ms=5, color=color[name],
                mfc="none" if name in peft else color[name], label=name)
        for r in (front[0], front[-1]):  # the grid's ends, so the direction of the sweep reads off the plot
            fx.annotate(f"{r['lr']:g}", (100 * r["target_accuracy"], 100 * r["retention"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=6, color=color[name])
    ax.set_title(title, fontsize=9)
    fx.set_title("fronts: every learning rate of the grid (first seed); PEFT's rows dashed", fontsize=9)
    for a in (ax, fx):
        a.set_xlabel("target task accuracy, % (learning) →")
        a.set_ylabel("fact recall retained, % of pre-trained (forgetting ↓)")
        a.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fx.legend(fontsize=6, loc="best")
    return harness.save_figure(fig, path)
