"""Raw Triton kernels and their per-GPU launch configurations (no dispatch logic here: see ``ops/``)."""
