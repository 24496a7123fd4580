"""Activation statistics of a model's linear layers over a calibration set (LoRA-Null's knowledge covariances):
:func:`calibrate`, in one pass (:mod:`.calibrate_one_pass`) or block by block (:mod:`.calibrate_sequential`)."""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Callable

import torch
from torch import nn

from .base_weights import prepare
from .blocks import NotAChain
from .calibrate_one_pass import calibrate_modules, check_max_batches
from .calibrate_sequential import OnBlock, calibrate_blocks, resolve_mode, split_targets
from .targets import find_targets

__all__ = ["calibrate", "calibrate_groups", "calibrate_modules", "check_data"]


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
            here every covariance is returned, so one pass is the cheaper way. A model whose forward is not a plain
            chain of its blocks (see :func:`calibrate_groups`) is refused by ``"sequential"`` and calibrated in one
            pass by ``"auto"``, with a warning.
        offload: ``None`` or ``"cpu"`` (sequential mode: keep the calibration set's hidden states on the CPU; a
            warning says when it is ignored because the calibration runs in one pass).

    Returns:
        ``{module name: C}``, C the (in, in) float32 per-token mean ``Σ_t x_t x_tᵀ / n_tokens`` on the layer's
        device. (The reference divides by the number of samples instead: a positive scalar factor, the same
        eigenvectors.) Layers that share an input map to one shared tensor (see the module docstring). Under an
        initialised ``torch.distributed`` process group every rank returns the statistic of all ranks' data.

    Raises:
        ValueError: empty data (no batch, or only padding), a targeted layer that never ran, non-finite activations
            (:class:`~loranull_kernels.covariance.NonFiniteCalibrationError`, naming the layer), no module matched,
            ``calibration_mode="sequential"`` on a model whose blocks are not a plain chain.
        TypeError: ``data`` is a single batch (a tensor or a dict) or not iterable; a batch of another type.
    """
    check_data(data)
    targets = find_targets(model, target_modules, exclude_modules, adapted=True)
    prepare(m for _, m in targets)  # bitsandbytes would repack 4-bit targets for CPU inference in these forwards
    out: dict[str, torch.Tensor] = {}
    calibrate_groups(model, targets, data, lambda name, group, covs: out.update(covs),
                     calibration_mode=calibration_mode, offload=offload, normalize=normalize, progress=progress,
                     max_batches=max_batches)
    return {name: out[name] for name, _ in targets}


def check_data(data, name: str = "data") -> None:
    """TypeError naming the argument unless ``data`` is an iterable of batches. A single tensor or dict is refused:
    iterated, it would be calibrated row by row (a tensor) or key by key (a dict)."""
    if isinstance(data, (torch.Tensor, Mapping)):
        raise TypeError(f"{name} must be an iterable of batches (a list, a DataLoader...), got a single "
                        f"{type(data).__name__}: wrap it in a list")
    if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):  # (iter() would start DataLoader workers)
        raise TypeError(f"{name} must be an iterable of batches (a list, a DataLoader...), got "
                        f"{type(data).__name__}")


def _reiterable(data: Iterable, max_batches: int | None) -> Iterable:
    """``data``, or for a one-shot iterator (a generator) its batches read into a list: block by block reads the
    data more than once (the blocks' inputs, the layers outside the stack, a fallback to one pass), and a generator
    would be empty the second time. The batches are small next to the hidden states kept for the blocks anyway."""
    if isinstance(data, Iterator):
        return list(itertools.islice(data, max_batches))
    return data


def calibrate_groups(model: nn.Module, targets: list[tuple[str, nn.Module]], data: Iterable, on_group: OnBlock, *,
                     calibration_mode: str = "auto", offload: str | None = None, normalize: bool = False,
                     progress: bool = True, max_batches: int | None = None,
                     before: Callable[[list | None, list | None], None] = lambda per_block, outside: None) -> None:
    """Calibrate resolved ``(name, module)`` targets in the mode asked; ``on_group(name, group, covariances)`` gets
    each group's covariances as soon as they are known: every block's, then the targets outside the block stack
    (:func:`~loranull_kernels.calibrate_sequential.calibrate_blocks`), or all of them at once (one pass, group name
    ``"model"``). What :func:`calibrate` and :func:`~loranull_kernels.inject` run.

    ``"sequential"`` / ``"auto"`` need the model's forward to be a plain chain of its block stack (each block once,
    in order, on the previous block's output; checked on the first batch before any statistic is taken): otherwise
    the blocks run alone would see other inputs than in the model. ``"sequential"`` then refuses (a ValueError
    naming ``calibration_mode``); ``"auto"`` warns and calibrates in one pass. Falling back rather than refusing is
    what ``"auto"`` promises: the right statistics in whichever mode can compute them.

    ``before(per_block, outside)`` runs before any work of a mode with its plan (:func:`~loranull_kernels.
    calibrate_sequential.split_targets`; ``None, None`` for one pass): the memory check.
    """
    check_max_batches(max_batches)
    stack = resolve_mode(model, targets, calibration_mode, offload)
    if stack is not None:
        data = _reiterable(data, max_batches)
        before(*split_targets(stack, targets))
        try:
            calibrate_blocks(model, targets, data, stack, on_group, normalize=normalize, progress=progress,
                             max_batches=max_batches, offload=offload)
            return
        except NotAChain as e:
            if calibration_mode == "sequential":
                raise ValueError(f"calibration_mode='sequential' cannot be used on this model: {e.reason}, so its "
                                 "blocks run one by one would compute other statistics than the model; use "
                                 "calibration_mode='one_pass' (or 'auto', which falls back to it)") from None
            warnings.warn(f"calibration_mode='auto': {e.reason}, so block-by-block calibration cannot reproduce "
                          "this model; calibrating in one pass instead (pass calibration_mode='one_pass' to skip "
                          "the check)", stacklevel=2)
    if offload is not None:
        warnings.warn(f"offload={offload!r} is ignored: it applies to block-by-block calibration, and this "
                      "calibration runs in one pass", stacklevel=2)
    before(None, None)
    covariances = calibrate_modules(model, targets, data, normalize=normalize, progress=progress,
                                    max_batches=max_batches)
    note = on_group("model", targets, covariances)
    if progress and note:
        print(f"calibration: {note}")
