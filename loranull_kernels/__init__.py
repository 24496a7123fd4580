"""loranull_kernels: fused kernels for knowledge-preserving LoRA-family adapters.

Public API (see README.md and DESIGN): ``lora_linear`` and the backend selection in ``backend``.
"""
from . import backend
from .config import AdapterConfig
from .nn import LoRALinear
from .ops.lora_linear import lora_linear

__version__ = "0.1.0"

__all__ = ["backend", "lora_linear", "AdapterConfig", "LoRALinear", "__version__"]
