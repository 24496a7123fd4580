"""loranull_kernels: fused kernels for knowledge-preserving LoRA-family adapters.

Public API (docs/design.md#public-api): the fused ops (``lora_linear`` with ``QuantizedWeight`` bases,
``covariance_update``, ``rsvd``) and their backend selection (``backend``); the layers ``LoRALinear`` and
``QuantizedLoRALinear``; the model-level API (``AdapterConfig``, ``inject``,
``calibrate``, ``nullspace``, ``regularization_loss``, ``after_optimizer_step``, ``estimate_curvature``); adapter
files (``save_adapter``, ``load_adapter``) and exports (``export_peft``, ``to_plain_lora``, :mod:`.export`); and
``integrations`` (PEFT, HF Trainer).
"""
from . import backend
from .config import AdapterConfig
from .nn import LoRALinear, QuantizedLoRALinear
from .ops.lora_linear import QuantizedWeight, lora_linear
from .ops.covariance import covariance_update
from .ops.rsvd import rsvd
from .covariance_accumulator import CovarianceAccumulator
from . import nullspace
from .inject import inject, print_trainable_parameters
from .calibrate import calibrate
from .adapter_files import save_adapter, load_adapter
from .export import export_peft, to_plain_lora
from .regularize import regularization_loss
from .sparsity import after_optimizer_step
from .curvature import estimate_curvature
from . import integrations

__version__ = "0.1.0"

__all__ = ["backend", "lora_linear", "QuantizedWeight", "AdapterConfig", "LoRALinear", "QuantizedLoRALinear",
           "covariance_update", "rsvd", "CovarianceAccumulator", "nullspace", "inject", "print_trainable_parameters",
           "calibrate",
           "save_adapter", "load_adapter", "export_peft", "to_plain_lora", "regularization_loss",
           "after_optimizer_step", "estimate_curvature", "integrations", "__version__"]
