"""Adapters in other formats: a plain LoRA on the original model (:mod:`.peft`: PEFT / vLLM directories) and the
sparse ΔW of masked adapters (:mod:`.sparse_delta`: RoseLoRA edits as indices and values)."""
from .peft import export_peft, to_plain_lora
from .sparse_delta import apply_sparse_delta, export_sparse_delta, load_sparse_delta

__all__ = ["export_peft", "to_plain_lora", "export_sparse_delta", "load_sparse_delta", "apply_sparse_delta"]
