"""loranull_kernels: fused kernels for knowledge-preserving LoRA-family adapters.

Public API (see README.md and docs/design.md#public-api): ``lora_linear`` and the backend selection in ``backend``.
"""
from . import backend
from .config import AdapterConfig
from .nn import LoRALinear
from .ops.lora_linear import lora_linear
from .ops.covariance import covariance_update
from .ops.rsvd import rsvd
from .covariance import CovarianceAccumulator
from . import nullspace
from .inject import inject, print_trainable_parameters
from .calibrate import calibrate
from .adapters import save_adapter, load_adapter, export_peft, to_plain_lora
from .regularize import regularization_loss
from .sparsity import after_optimizer_step
from .curvature import estimate_curvature
from . import integrations

__version__ = "0.1.0"

__all__ = ["backend", "lora_linear", "AdapterConfig", "LoRALinear", "covariance_update", "rsvd",
           "CovarianceAccumulator", "nullspace", "inject", "print_trainable_parameters", "calibrate",
           "save_adapter", "load_adapter", "export_peft", "to_plain_lora", "regularization_loss",
           "after_optimizer_step", "estimate_curvature", "integrations", "__version__"]
