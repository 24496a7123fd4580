"""The forgetting benchmark: the ``loranull-forgetting`` console command, from a checkout (see
loranull_kernels/bench/forgetting.py and the "Forgetting" section of docs/benchmarks.md).

    python benchmarks/bench_forgetting.py [--quick] [--workers N] [--methods lora "lora_null v2" ...]
"""
from loranull_kernels.bench.forgetting_report import cli

if __name__ == "__main__":
    raise SystemExit(cli())
