"""Export adapters as a plain LoRA on the original model: :func:`to_plain_lora` per layer, :func:`export_peft` for a
whole model as a PEFT LoRA directory (which vLLM and other LoRA consumers also read)."""
from __future__ import annotations

import json
import os

import safetensors.torch as st
import torch
from torch import nn

from .._dtypes import compute_dtype
from ..adapter_files import cpu_copy
from ..adapter_layers import adapter_layers, single_config
from ..atomic_dir import atomic_directory
from ..nn import LoRALinear

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def to_plain_lora(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The layer's change to its *original* weight as a plain LoRA: ``(A', B', scaling)`` with
    ``scaling · B' A' = (weight + delta_weight()) − original_weight()``.

    Masks are folded into A and B, ``rank_scale`` into B. For base-rewriting methods (``lora_A0`` set: pissa,
    milora, lora_null, kasa) the rank doubles: ``A' = [A; A0]`` (2r, in), ``B' = [B, −B0]`` (out, 2r), i.e.
    ``ΔW = s(BA − B0A0)``; otherwise ``A'`` (r, in), ``B'`` (out, r). Computed in float32 (float64 for float64
    layers); ``scaling`` is the layer's ``s``. Independent of the merge state.
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"to_plain_lora needs a LoRALinear, got {type(layer).__name__}")
    cd = compute_dtype(layer.base_dtype)
    A, B = layer.effective_factors(cd)
    if layer.lora_A0 is not None:
        A = torch.cat([A, layer.lora_A0.to(cd)], dim=0)
        B = torch.cat([B, -layer.lora_B0.to(cd)], dim=1)
    return A, B, layer.scaling


def export_peft(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key layout
    ``base_model.model.<module>.lora_{A,B}.weight``) that ``peft.PeftModel.from_pretrained(original_model, path)``
    loads to the same outputs as ``model`` (on a quantized base: as ``model`` with ``quantized_rewrite="low_rank"``;
    under ``"requantize"`` the original base differs from the re-quantized one ``model`` runs on by that rounding);
    vLLM and other LoRA consumers read the same files.

    The adapter is :func:`to_plain_lora` of every layer, on the ORIGINAL base: rank 2r for base-rewriting methods,
    ``lora_alpha = s · rank`` with ``use_rslora = False`` so PEFT's ``lora_alpha / r`` reproduces ``s`` exactly.
    Trained biases are exported with ``bias = "lora_only"``. Merged layers export the same as unmerged ones (only
    adapter tensors are read). Inference is identical; when training continues in PEFT with dropout > 0, PEFT's
    dropout also applies to the ``−B0A0`` half, which a dense layer of ours keeps in the (dropout-free) base (a
    quantized one with ``"low_rank"`` runs it through the fused op, dropout included, as PEFT does).

    Raises:
        ValueError: the model has no adapter. FileExistsError: as :func:`~loranull_kernels.save_adapter`.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no LoRALinear adapter")
    cfg = single_config(layers, "export_peft")
    tensors, ranks, scalings = {}, set(), set()
    train_bias = False
    for name, layer in layers:
        A, B, s = to_plain_lora(layer)
        ranks.add(A.shape[0])
        scalings.add(s)
        dt = layer.lora_A.dtype
        tensors[f"base_model.model.{name}.lora_A.weight"] = cpu_copy(A.to(dt))
        tensors[f"base_model.model.{name}.lora_B.weight"] = cpu_copy(B.to(dt))
        if layer.bias is not None and layer.bias.requires_grad:
            train_bias = True
            tensors[f"base_model.model.{name}.base_layer.bias"] = cpu_copy(layer.bias)
    if len(ranks) > 1 or len(scalings) > 1:
        raise ValueError(f"export_peft: layers convert to different ranks {sorted(ranks)} / scalings; one "
                         "AdapterConfig per model is supported")
    rank, s = ranks.pop(), scalings.pop()
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": rank,
        "lora_alpha": s * rank,
        "use_rslora": False,
        "lora_dropout": cfg.dropout,
        "target_modules": [n for n, _ in layers],
        "fan_in_fan_out": any(getattr(l, "fan_in_fan_out", False) for _, l in layers),
        "bias": "lora_only" if train_bias else "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_directory(path, (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME), "export_peft") as tmp:
        st.save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / PEFT_CONFIG_NAME, "w") as f:
            json.dump(peft_config, f, indent=2)
