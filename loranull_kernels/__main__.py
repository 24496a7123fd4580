"""The main job: python -m loranull_kernels runs on whatever device exists (CPU included):

1. the capability report (which backend runs where);
2. the quick microbenchmark against vanilla LoRA (frozen nn.Linear, naive PyTorch LoRA, HF PEFT LoRA, ours),
   writing a CSV and a PNG to the output directory;
3. the demos (loranull-demo): a training demo of the fused op, then LoRA-Null v2 injected into a tiny
   transformers Llama, calibrated on knowledge batches and fine-tuned on a new task, against plain LoRA.

Results go to --out-dir (default: $LORANULL_RESULTS or ~/.cache/loranull_kernels/results), never into the source
tree unless asked (--out-dir benchmarks/results rewrites a checkout's committed results). --full runs the whole
benchmark sweep instead of the quick one.
"""
import time

from . import _cli, backend, demo
from .bench import harness
from .bench import lora_linear as bench_lora_linear


def main(argv=None) -> dict:
    """Run the report, the benchmark and the demos; returns ``{"rows", "demo", "out_dir", "seconds"}``."""
    p = _cli.ArgumentParser("python -m loranull_kernels", _cli.plain(__doc__))
    p.add_argument("--full", action="store_true", help="the full benchmark sweep (long)")
    p.add_argument("--skip-bench", action="store_true", help="only the report and the demos")
    p.add_argument("--out-dir", default=None, help="where the benchmark's CSV and PNG go (see above)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out_dir = args.out_dir if args.out_dir is not None else str(harness.default_out_dir())
    if not args.skip_bench:
        harness.check_out_dir(p, args.out_dir)
    backend.report()
    rows = None
    if not args.skip_bench:
        rows = bench_lora_linear.main(([] if args.full else ["--quick"]) + ["--out-dir", out_dir])
    flags = ["--no-progress"] if args.no_progress else []
    summary = demo.main(flags)
    seconds = time.perf_counter() - start
    print(f"\nmain job done in {seconds:.0f} s" + ("" if args.skip_bench else f"; results in {out_dir}"))
    return {"rows": rows, "demo": summary, "out_dir": out_dir, "seconds": seconds}


cli = _cli.console_script(main, "python -m loranull_kernels")


if __name__ == "__main__":
    raise SystemExit(cli())
