"""LoRA linear microbenchmark (same as the `loranull-bench` console command). See loranull_kernels/bench/lora_linear.py."""
from loranull_kernels.bench.lora_linear import main

if __name__ == "__main__":
    main()
