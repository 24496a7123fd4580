"""Sparse weight edits: export the ΔW of sparse adapters (RoseLoRA) as indices + values, and apply them.

A knowledge edit should change nothing outside its support. ``export_sparse_delta`` writes, per adapter layer, the
nonzero entries of ``ΔW = s·(B⊙mask_B) diag(d) (A⊙mask_A)`` (float32; float64 for float64 models) to one safetensors
file: ``<module>.indices`` (nnz, 2) int64 rows ``(out index, in index)``, ``<module>.values`` (nnz,), and in the
header's metadata the format name and every module's weight shape. ``apply_sparse_delta`` adds them to the
``nn.Linear`` weights of an original model, touching those entries only (each rounded once to the weight's dtype).
"""
from __future__ import annotations

import json
import os

import safetensors.torch as st
import torch
from torch import nn

from ..adapter_layers import configured_layers
from ..base_weights import base_weight

FORMAT = "loranull_kernels.sparse_delta"


def sparse_delta(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices (nnz, 2) int64, values (nnz,))`` of the layer's nonzero ΔW entries, row-major order."""
    delta = layer.delta_weight()
    indices = torch.nonzero(delta)
    return indices, delta[indices[:, 0], indices[:, 1]]


def export_sparse_delta(model: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Write the sparse ΔW of every adapter layer of ``model`` to the safetensors file ``path``.

    The edit is relative to the pre-trained weights only for initialisers that keep the base (lora, roselora,
    lalora): base-rewriting ones (pissa, milora, lora_null, kasa) changed the base densely (``W − s·B0A0``), so they
    are refused: save those with ``save_adapter`` / ``export_peft``.

    Returns:
        ``{module name: number of entries}``.

    Raises:
        ValueError: no adapter layer, or a layer whose base was rewritten.
    """
    tensors, shapes, counts = {}, {}, {}
    for name, layer, cfg in configured_layers(model):
        if layer.lora_A0 is not None:
            raise ValueError(f"export_sparse_delta: {name!r} uses method {cfg.method!r}, which rewrote the base "
                             "weight (W_base = W − s·B0A0): its change to the pre-trained weight is dense. Use an "
                             "initialiser that keeps the base (lora / roselora) for sparse edits")
        indices, values = sparse_delta(layer)
        tensors[f"{name}.indices"] = indices.cpu().contiguous()
        tensors[f"{name}.values"] = values.cpu().contiguous()
        shapes[name] = [layer.out_features, layer.in_features]
        counts[name] = int(values.numel())
    if not shapes:
        raise ValueError("export_sparse_delta: the model has no LoRALinear adapter")
    st.save_file(tensors, str(path), metadata={"format": FORMAT, "shapes": json.dumps(shapes)})
    return counts


def load_sparse_delta(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """Read a file of :func:`export_sparse_delta`: ``{module name: (indices, values, (out, in))}``."""
    with st.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sparse delta file (format={meta.get('format')!r})")
        shapes = json.loads(meta["shapes"])
        return {name: (f.get_tensor(f"{name}.indices"), f.get_tensor(f"{name}.values"), tuple(shape))
                for name, shape in shapes.items()}


@torch.no_grad()
def apply_sparse_delta(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the sparse ΔW saved at ``path`` to the weights of ``model``'s ``nn.Linear`` modules of the same names
    (the original, un-adapted model). Entries outside each ΔW's support stay bit-identical. Returns ``model``.

    Raises:
        ValueError: a module is missing, is not an ``nn.Linear``, or has another shape.
    """
    deltas = load_sparse_delta(path)
    targets = {}
    for name, (_, _, shape) in deltas.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"apply_sparse_delta: the model has no module {name!r}") from None
        base = base_weight(module)
        if base is not None and base.quantized_format is not None:
            raise ValueError(f"apply_sparse_delta: {name!r} is quantized ({base.kind}): a sparse edit changes single "
                             "weights, which a quantized layer does not store; apply it to the dense model")
        if type(module) is not nn.Linear:
            raise ValueError(f"apply_sparse_delta: {name!r} is a {type(module).__name__}, not an nn.Linear (apply "
                             "the edit to the original model)")
        if tuple(module.weight.shape) != shape:
            raise ValueError(f"apply_sparse_delta: {name!r} has weight shape {tuple(module.weight.shape)}, the edit "
                             f"{shape}")
        targets[name] = module
    for name, (indices, values, _) in deltas.items():
        W = targets[name].weight
        rows, cols = indices[:, 0].to(W.device), indices[:, 1].to(W.device)
        W[rows, cols] = (W[rows, cols].to(values.dtype) + values.to(W.device)).to(W.dtype)
    return model
