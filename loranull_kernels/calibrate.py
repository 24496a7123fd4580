"""Activation statistics of a model's linear layers over a calibration set (LoRA-Null's knowledge covariances):
:func:`calibrate`, in one pass (:mod:`.calibrate_one_pass`) or block by block (:mod:`.calibrate_sequential`)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .calibrate_one_pass import calibrate_modules
from .calibrate_sequential import calibrate_blocks, resolve_mode
from .targets import find_targets

__all__ = ["calibrate", "calibrate_modules"]


def calibrate(model: nn.Module, data: Iterable, target_modules: str | Iterable[str] = "all-linear",
              exclude_modules: Iterable[str] = (), *, normalize: bool = False, progress: bool = True,
              max_batches: int | None = None, calibration_mode: str = "one_pass",
              offload: str | None = None) -> dict[str, torch.Tensor]:
    """Per-layer input covariances of ``model`` over the calibration ``data``.

    Runs ``model`` in eval mode under ``torch.no_grad`` (each module's train/eval mode is restored afterwards, and
    the hooks are removed even when a batch raises) over every batch of ``data``, moved to the model's device:

    - a dict (any Mapping, e.g. a tokenizer's BatchEncoding) is called as ``model(**batch)``; its
      ``attention_mask`` (batch, seq) masks padding tokens out of every layer whose input is (batch, seq, in) or
      (batch·seq, in); a (batch, in) input (one vector per sample, e.g. a pooler's) has no padding; a layer whose
      input lines up with neither gets a warning and is accumulated unmasked;
    - a tensor as ``model(batch)``; a tuple or list as ``model(*batch)``.

    Args:
        model: any nn.Module; targeted layers are nn.Linear, GPT-2 Conv1D or already-adapted LoRALinear.
        data: an iterable of batches (a DataLoader, a list...).
        target_modules, exclude_modules: as :class:`~loranull_kernels.AdapterConfig`'s (suffixes, a regex, or
            ``"all-linear"``).
        normalize: divide each sample's activations by ``|max x|`` first (the LoRA-Null reference's option).
        progress: show a tqdm bar (rank 0 only under torch.distributed).
        max_batches: stop after this many batches.
        calibration_mode: ``"one_pass"`` (default: hooks on the whole model, one forward pass per batch), or
            ``"sequential"`` / ``"auto"``: block by block (:func:`loranull_kernels.calibrate_sequential.calibrate_blocks`),
            the same statistics up to float32 rounding. Block by block saves memory only inside
            :func:`~loranull_kernels.inject`, which turns each block's covariances into adapters and frees them;
            here every covariance is returned, so one pass is the cheaper way.
        offload: ``None`` or ``"cpu"`` (sequential mode: keep the calibration set's hidden states on the CPU).

    Returns:
        ``{module name: C}``, C the (in, in) float32 per-token mean ``Σ_t x_t x_tᵀ / n_tokens`` on the layer's
        device. (The reference divides by the number of samples instead: a positive scalar factor, the same
        eigenvectors.) Layers that share an input map to one shared tensor (see the module docstring). Under an
        initialised ``torch.distributed`` process group every rank returns the statistic of all ranks' data.

    Raises:
        ValueError: empty data (no batch, or only padding), a targeted layer that never ran, non-finite activations
            (:class:`~loranull_kernels.covariance.NonFiniteCalibrationError`, naming the layer), no module matched.
        TypeError: a batch of another type.
    """
    targets = find_targets(model, target_modules, exclude_modules, adapted=True)
    stack = resolve_mode(model, targets, calibration_mode, offload)
    if stack is None:
        return calibrate_modules(model, targets, data, normalize=normalize, progress=progress, max_batches=max_batches)
    out: dict[str, torch.Tensor] = {}
    calibrate_blocks(model, targets, data, stack, lambda name, block_targets, covs: out.update(covs),
                     normalize=normalize, progress=progress, max_batches=max_batches, offload=offload)
    return {name: out[name] for name, _ in targets}
