"""The benchmarks a user runs as tools, and their harness.

- ``lora_linear``: the microbenchmark against vanilla LoRA (``loranull-bench``; ``roofline``: its GPU prediction);
- ``forgetting_report`` (``loranull-forgetting``) over ``forgetting``, ``pretrain``, ``world``, ``qa`` and
  ``arithmetic``: the forgetting evaluation; with ``--model``, ``llm_forgetting_report`` over ``llm_forgetting``
  and its ``llm_*`` pieces (``llm_calibration``: the calibration text); ``peft_peers``: PEFT's own
  initialisations as rows of both; ``forgetting_table``: the summary, tables and plot both reports share;
- ``harness``: timing, environment, CSV, plots; results go to ``--out-dir`` (default ``$LORANULL_RESULTS`` or
  ``~/.cache/loranull_kernels/results``).

The developer benchmarks (calibration kernels, whole-model calibration, null-space solvers, the calibration-text
study) are scripts in the
repository's ``benchmarks/`` folder, beside ``tests/``.
"""
