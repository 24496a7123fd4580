"""LoRA linear microbenchmark: the ``loranull-bench`` console command, from a checkout. See
loranull_kernels/bench/lora_linear.py.

    python benchmarks/bench_lora_linear.py [--quick] [--out-dir DIR]
"""
from loranull_kernels.bench.lora_linear import cli

if __name__ == "__main__":
    raise SystemExit(cli())
