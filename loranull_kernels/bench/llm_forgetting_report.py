"""Files and console output of the real-model forgetting benchmark (``loranull-forgetting --model ...``).

Writes ``forgetting_<model>_runs_<device>.csv`` (every run, the learning-rate sweeps included),
``forgetting_<model>_<device>.csv`` (one row per method at its selected rate: mean and standard deviation over the
seeds) and ``forgetting_<model>_<device>.png`` (retention against test accuracy, one point per method with its
spread), ``forgetting_quick_<model>...`` in quick mode. The table, CSV columns and plot are
:mod:`.forgetting_table`'s, so the toy and the real-model results read alike.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import harness, llm_model
from .forgetting_table import front_table, markdown_table, plot, summarize
from .forgetting import with_run_choices
from .llm_forgetting import FULL, QUICK, LLMBenchmarkConfig, methods, run


def title(result: dict) -> str:
    """The plot's title: device, model, probe and protocol."""
    setup, cfg = result["setup"], result["setup"].config
    rec = setup.record
    return (f"{harness.device_name(setup.device)}: {rec['model']} ({rec['parameters'] / 1e6:.0f} M parameters), "
            f"\n{rec['held_out_facts']} held-out facts of {rec['facts']} known; r = {cfg.r}, {cfg.steps} steps of "
            f"{cfg.batch_size}, {len(cfg.seeds)} seed{'s' * (len(cfg.seeds) > 1)}")


def variant(cfg: LLMBenchmarkConfig) -> str:
    """The file-name suffix of a non-default task or calibration text: ``"_add"``, ``"_cal-docs-0.5"``, ''."""
    out = "" if cfg.task == FULL.task else f"_{cfg.task}"
    if (cfg.calibration, cfg.calibration_fraction) != (FULL.calibration, FULL.calibration_fraction):
        out += f"_cal-{cfg.calibration}-{cfg.calibration_fraction:g}"
    return out


def write(result: dict, out_dir=None, quick: bool = False) -> dict[str, Path]:
    """The two CSVs and the plot of a :func:`.llm_forgetting.run` result; returns their paths."""
    setup = result["setup"]
    summary = summarize(result["runs"], setup.record)
    for row in summary:
        row.update(model=setup.name, model_hash=setup.key, held_out_facts=len(setup.held_out),
                   base_task_accuracy=setup.base_task_accuracy)
    stem = f"forgetting{'_quick' * quick}_{setup.name}{variant(setup.config)}"

    def where(suffix: str, ext: str) -> Path:
        return harness.results_path(stem + suffix, ext, setup.device, out_dir)

    return {"runs": harness.write_csv(result["runs"], where("_runs", "csv"), setup.device),
            "summary": harness.write_csv(summary, where("", "csv"), setup.device),
            "plot": plot(summary, result["runs"], where("", "png"), title(result))}


def config_from_args(args) -> LLMBenchmarkConfig:
    """The configuration ``loranull-forgetting --model`` runs: ``--quick`` or the full one, with ``--methods``,
    ``--seeds``, ``--lrs``, ``--peers``, ``--task``, ``--calibration(-fraction)`` and ``--quantize`` applied. Raises ValueError for an unknown method name or a ``--quantize`` without
    bitsandbytes, and FileNotFoundError for a missing model file or folder, or a Hugging Face id neither the hub nor
    its cache has, before any model is loaded."""
    llm_model.check_available(llm_model.resolve(args.model))
    cfg = with_run_choices(QUICK if args.quick else FULL, args.methods, args.seeds, args.lrs, args.peers)
    for name in ("task", "calibration", "calibration_fraction"):
        if getattr(args, name, None) is not None:
            cfg = dataclasses.replace(cfg, **{name: getattr(args, name)})
    if getattr(args, "quantize", None):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError(f"--quantize {args.quantize} needs bitsandbytes: pip install "
                             "'loranull-kernels[quant]'") from None
        cfg = dataclasses.replace(cfg, quantize=args.quantize)
    methods(cfg)
    return cfg


def main(args, cfg: LLMBenchmarkConfig) -> dict:
    """Run the benchmark on ``args.model`` with ``cfg``, write its files, print the table."""
    result = run(cfg, args.model, device=args.device, progress=not args.no_progress)
    paths = write(result, args.out_dir, quick=args.quick)
    setup = result["setup"]
    rec = setup.record
    print(f"\n{rec['model']} (hash {rec['model_hash']}): {rec['parameters']:,} parameters; knows {rec['facts']} of "
          f"{rec['probe_facts']} probe facts ({rec['calibration_facts']} calibration, {rec['held_out_facts']} held "
          f"out scored); base accuracy on the task {100 * setup.base_task_accuracy:.0f}%")
    if setup.config.quantize:
        print(f"base quantized to {setup.config.quantize} in memory (llm_model.quantize); full fine-tuning is not "
              "run on a 4-bit base")
    print(markdown_table(summarize(result["runs"], rec)))
    print("\nfronts (first seed, every rate of the grid; test accuracy / retention %, selected rate in bold):\n"
          + front_table(result["runs"]))
    cached = sum(bool(r.get("cached")) for r in result["runs"])
    print(f"\n{len(result['runs'])} runs ({cached} from the cache) in {result['seconds']:.0f} s; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return {"result": result, "paths": paths}
