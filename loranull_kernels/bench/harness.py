"""The shared benchmark harness: what ran where, how long it took, and where the results go.

- :func:`environment`: device, torch/triton versions, date, git commit: added to every CSV row.
- :func:`time_fn` / :func:`time_interleaved`: median, min, max and 20th/80th percentiles in milliseconds. On CUDA
  through ``triton.testing.do_bench``; on CPU with ``time.perf_counter``, the providers of one comparison alternating
  round by round so that slow drifts of a shared machine hit all of them alike (compare ratios within one run:
  docs/performance.md); :func:`ratio_spread` turns the rounds into the spread of a ratio.
- :func:`write_csv`, :func:`plot`, :func:`results_path`: ``{out_dir}/{name}_{device_slug}.{csv,png}``, where
  ``out_dir`` defaults to :func:`default_out_dir` (outside any source tree); the committed results under
  ``benchmarks/results/`` are only rewritten when a command is given that directory explicitly;
  :func:`markdown_table` for the tables the commands print.
"""
from __future__ import annotations

import csv
import datetime
import functools
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

# Where git starts looking for the checkout this module runs from (it searches upwards itself; an installed copy
# outside any checkout has none): only used to record the git commit of a result.
_SOURCE_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """``$LORANULL_CACHE`` or ``~/.cache/loranull_kernels``: pre-trained benchmark models and default results."""
    return Path(os.environ.get("LORANULL_CACHE", Path.home() / ".cache" / "loranull_kernels"))


def default_out_dir() -> Path:
    """Where commands write results unless told otherwise: ``$LORANULL_RESULTS``, else ``cache_dir()/results``."""
    return Path(os.environ.get("LORANULL_RESULTS", cache_dir() / "results"))


def check_out_dir(parser, out_dir) -> None:
    """``parser.error`` (exit status 2, one line naming the option) unless ``--out-dir`` (or, when it is None, the
    default output folder) can receive the command's files: checked before any work starts."""
    from .._cli import unwritable_dir

    why = (unwritable_dir(out_dir, "--out-dir") if out_dir is not None
           else unwritable_dir(default_out_dir(), "the default --out-dir ($LORANULL_RESULTS)"))
    if why:
        parser.error(why)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device=None) -> str:
    """``torch.cuda.get_device_name`` for CUDA, the CPU model (from /proc/cpuinfo) otherwise."""
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_slug(device=None) -> str:
    """A file-name-safe short form of :func:`device_name`, e.g. ``nvidia-h100-80gb-hbm3``, ``intel-xeon-platinum-8480c``."""
    name = device_name(device)
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\bprocessor\b|\d+-core", " ", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@functools.lru_cache(maxsize=None)
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_SOURCE_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device=None) -> dict:
    """Where and with what a result was measured: ``device``, ``torch``, ``triton``, ``cuda`` (the CUDA runtime torch
    was built with, or "none"), ``date`` (ISO, UTC), ``commit`` (short hash or "unknown") and ``dirty`` (True when
    the working tree had uncommitted changes to tracked files)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "unavailable"
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "commit": commit or "unknown",
        "dirty": bool(status) if status is not None else "unknown",
    }


def _summary(samples_ms: list[float]) -> dict:
    qs = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) > 1 else samples_ms * 9
    return {"median_ms": statistics.median(samples_ms), "p20_ms": qs[1], "p80_ms": qs[7], "min_ms": min(samples_ms),
            "max_ms": max(samples_ms), "samples_ms": list(samples_ms)}


def ratio_spread(numerator: dict, denominator: dict) -> dict:
    """The spread of ``numerator / denominator`` over the rounds of one :func:`time_interleaved` call (the two
    providers' samples of a round were taken back to back): ``{"median", "min", "max"}``."""
    ratios = [a / b for a, b in zip(numerator["samples_ms"], denominator["samples_ms"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, warmup: float = 25, rep: float = 100, device=None, min_reps: int = 3) -> dict:
    """Time ``fn()``: ``{"median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "samples_ms"}``.

    ``warmup`` and ``rep`` are milliseconds, as in ``triton.testing.do_bench`` (which runs on CUDA): untimed calls
    for ``warmup`` ms (at least one), then timed calls for ``rep`` ms (at least ``min_reps``). CPU calls are timed one
    by one with ``time.perf_counter``.
    """
    device = _device(device)
    if device.type == "cuda":
        import triton.testing

        med, p20, p80, lo, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8, 0, 1])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "min_ms": lo, "max_ms": hi, "samples_ms": [med]}
    start = time.perf_counter()
    while True:
        fn()
        if (time.perf_counter() - start) * 1e3 >= warmup:
            break
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start) * 1e3 < rep:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _summary(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 2, device=None,
                     rep_ms: float = 20) -> dict[str, dict]:
    """Time several providers of one comparison, alternating them round by round.

    ``warmup`` untimed calls of each provider first; then ``rounds`` rounds, each timing every provider once, in an
    order rotated every round (no provider always runs right after the same one). On CPU a round's sample is one
    call (``time.perf_counter``); on CUDA it is the median of ``do_bench`` over about ``rep_ms`` ms.
    Returns ``{name: {"median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "samples_ms"}}`` over the rounds
    (``samples_ms[i]``: round i, for :func:`ratio_spread`).
    """
    device = _device(device)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
        _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    if device.type == "cuda":
        import triton.testing
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            if device.type == "cuda":
                samples[name].append(triton.testing.do_bench(fns[name], warmup=0, rep=rep_ms, return_mode="median"))
            else:
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {n: _summary(samples[n]) for n in names}


def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident memory from ``/proc/self/status`` in KiB: ``VmRSS`` now, or ``VmHWM`` (its peak, which
    writing ``5`` to ``/proc/self/clear_refs`` resets to the current RSS). Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def results_path(name: str, ext: str, device=None, out_dir=None) -> Path:
    """``{out_dir}/{name}_{device_slug}.{ext}``; ``out_dir`` None: :func:`default_out_dir`."""
    root = Path(out_dir) if out_dir is not None else default_out_dir()
    return root / f"{name}_{device_slug(device)}.{ext.lstrip('.')}"


def write_csv(rows: list[dict], path, device=None) -> Path:
    """Write ``rows`` (dicts; the union of their keys, in order of first appearance, becomes the header) with the
    :func:`environment` columns appended to every row; creates the directory. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    fields.extend(k for k in env if k not in fields)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})
    return path


def plot(rows: list[dict], *, x: str, y: str, group: str, path=None, ax=None, kind: str = "line",
         title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
         logx: bool = False, logy: bool = False):
    """Plot ``y`` against ``x``, one series per value of ``group``, as lines (numeric x) or grouped bars.

    Draws into ``ax`` when given (for multi-panel figures, then save with :func:`save_figure`); otherwise makes a
    figure and writes it to ``path`` (PNG, Agg backend). Returns the Axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = list(dict.fromkeys(r[group] for r in rows))
    xs = list(dict.fromkeys(r[x] for r in rows))
    for gi, g in enumerate(groups):
        sel = {r[x]: r[y] for r in rows if r[group] == g}
        if kind == "line":
            pts = sorted((k, v) for k, v in sel.items() if v is not None and not _isnan(v))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(g))
        else:
            width = 0.8 / max(1, len(groups))
            ax.bar([i + gi * width for i in range(len(xs))], [sel.get(v, math.nan) for v in xs], width, label=str(g))
    if kind != "line":
        ax.set_xticks([i + 0.4 - 0.4 / max(1, len(groups)) for i in range(len(xs))])
        ax.set_xticklabels([str(v) for v in xs], fontsize=8)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x if xlabel is None else xlabel)
    ax.set_ylabel(y if ylabel is None else ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if fig is not None:
        save_figure(fig, path)
    return ax


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG (creating the directory) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(header: list[str], cells) -> str:
    """A Markdown table: ``header`` holds the column titles, ``cells`` one list of already formatted values per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def finish(rows: list[dict], name: str, device, table: str, out_dir=None, plot=None) -> dict[str, Path]:
    """The end of every benchmark command: write ``rows`` as ``{name}_{device}.csv`` (and the figure, through
    ``plot(rows, path)`` when given) to ``out_dir`` (default :func:`default_out_dir`), print where and with what it
    ran, ``table`` and the paths written. Returns ``{"csv": path[, "png": path]}``."""
    paths = {"csv": write_csv(rows, results_path(name, "csv", device, out_dir), device)}
    if plot is not None:
        paths["png"] = results_path(name, "png", device, out_dir)
        plot(rows, paths["png"])
    env = environment(device)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"threads {torch.get_num_threads()}\n")
    print(table)
    print("\nwrote " + " and ".join(str(p) for p in paths.values()))
    return paths

