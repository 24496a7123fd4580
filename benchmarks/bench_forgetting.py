"""The forgetting benchmark (see loranull_kernels/bench/forgetting.py and the README's "Forgetting" section).

    python benchmarks/bench_forgetting.py [--quick] [--workers N] [--methods lora "lora_null v2" ...]
"""
import sys

from loranull_kernels.bench.forgetting_report import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
