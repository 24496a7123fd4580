"""The main job: ``python -m loranull_kernels`` runs on whatever device exists (CPU included):

1. the capability report (which backend runs where);
2. the quick microbenchmark against vanilla LoRA (frozen nn.Linear, naive PyTorch LoRA, HF PEFT LoRA, ours),
   writing a CSV and a PNG under benchmarks/results/;
3. the demos (:mod:`loranull_kernels.demo`): a training demo of the fused op, then LoRA-Null v2 injected into a
   tiny transformers Llama, calibrated on knowledge batches and fine-tuned on a new task, against plain LoRA.

``--full`` runs the whole benchmark sweep instead of the quick one.
"""
import argparse

from . import backend, demo
from .bench import lora_linear as bench_lora_linear


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loranull_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full benchmark sweep (long)")
    parser.add_argument("--skip-bench", action="store_true", help="only the report and the demo")
    args = parser.parse_args(argv)
    backend.report()
    if not args.skip_bench:
        bench_lora_linear.main([] if args.full else ["--quick"])
    demo.main()


if __name__ == "__main__":
    main()
