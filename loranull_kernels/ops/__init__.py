"""One package per operation, all laid out alike (docs/design.md#backends):

``ops/<op>/__init__.py``  the public function: validation, ``backend.select`` among its ``IMPLEMENTATIONS``,
                          reshaping, and its ``torch.library`` custom op / ``torch.autograd.Function``
``torch_backend.py``      the PyTorch implementation: every op has one, and it documents the backends' contract
``triton_backend.py``     the Triton launcher (imports Triton on first launch) and its per-GPU launch configurations
``triton_kernels.py``     the ``@triton.jit`` kernels
``cuda_backend.py``       the call into the compiled CUDA extension ``_C`` (csrc/)
"""
