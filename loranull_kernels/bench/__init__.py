"""Benchmarks: the shared harness (``harness``: timing, environment, CSV, plots) and one module per benchmark.

Run them as ``python -m loranull_kernels.bench.<name>`` or through the thin scripts in ``benchmarks/``.
"""
