"""The developer benchmarks: one file per benchmark, run from a checkout with the package installed.

    python benchmarks/bench_calibration.py        # covariance kernel, randomized SVD, batched rSVD
    python benchmarks/bench_calibration_model.py  # whole-model LoRA-Null calibration at real Llama sizes
    python benchmarks/bench_nullspace.py          # null-space solvers: eigh vs randomized
    python benchmarks/bench_lora_linear.py        # = loranull-bench (the package's microbenchmark)
    python benchmarks/bench_forgetting.py         # = loranull-forgetting (the package's forgetting evaluation)

A package only so that the tests can import them (``benchmarks.bench_<name>``); the shared harness, and the two
benchmarks a user runs as tools, live in ``loranull_kernels.bench``. Results: ``--out-dir`` (default
``$LORANULL_RESULTS`` or ``~/.cache/loranull_kernels/results``); the committed ones are in ``benchmarks/results/``.
"""
