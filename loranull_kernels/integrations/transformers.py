"""Train injected adapters with HF ``transformers.Trainer`` (and everything built on it: TRL's ``SFTTrainer``).

:class:`AdapterCallback` does what a hand-written loop would do around the optimiser step:

- the penalties (KaSA, LaLoRA) need nothing: the penalty hooks (:func:`loranull_kernels.regularize.
  enable_penalty_hooks`, on after ``lk.inject``; the callback turns them on for models that came from
  ``lk.load_adapter``) add their gradient at each ``optimizer.step()``;
- the sparsity schedule (RoseLoRA) runs after each optimiser step (``on_optimizer_step``: after ``step()``, before
  the Trainer's ``zero_grad``, so it reads the accumulated gradient), with the Trainer's ``global_step`` as t;
- the penalties and the RoseLoRA density are added to each log (``state.log_history``, and the ``logs`` that the
  callbacks after this one receive; :func:`attach` puts it first so the console, TensorBoard, W&B... see them);
- checkpoints hold only the adapter: ``model.save_pretrained`` (what the Trainer calls for checkpoints and
  ``save_model``) writes the package's adapter files (safetensors + JSON, :func:`loranull_kernels.save_adapter`:
  masks, importance EMA, step counter, curvature included) instead of the full model, beside an empty
  ``model.safetensors.index.json`` that lets the Trainer's own resume logic accept the directory (it loads no
  tensor from it); ``resume_from_checkpoint`` then restores the adapter with :func:`loranull_kernels.load_adapter`
  in ``on_train_begin``, after the Trainer has restored its optimiser, scheduler and RNG state.

Models without :class:`~loranull_kernels.LoRALinear` layers (a PEFT model patched with
:func:`loranull_kernels.integrations.peft.patch`) are left to the Trainer: PEFT saves and resumes its own adapter.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import types
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .. import adapter_files as _adapter_files
from ..adapter_layers import adapter_layers, configured_layers
from ..regularize import enable_penalty_hooks, penalty_values
from ..sparsity import after_optimizer_step

__all__ = ["AdapterCallback", "attach", "rose_density"]

logger = logging.getLogger(__name__)

_PATCHED = "_loranull_save_pretrained"
INDEX_NAME = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME


def rose_density(model: nn.Module) -> float | None:
    """Fraction of the entries of the scheduled (RoseLoRA) trainable factors that are kept (unmasked), over all
    such layers; 1.0 before the first pruning step, None when no layer has a sparsity schedule."""
    kept = total = 0
    for _, layer, cfg in configured_layers(model):
        if cfg.effective_sparsity is None:
            continue
        for factor, mask in ((layer.lora_A, layer.mask_A), (layer.lora_B, layer.mask_B)):
            if not factor.requires_grad:
                continue
            total += factor.numel()
            kept += factor.numel() if mask is None else int(mask.sum())
    return kept / total if total else None


def _has_adapters(model) -> bool:
    return model is not None and bool(adapter_layers(model))


def _gradients_finite(model: nn.Module) -> bool:
    grads = [p.grad for _, layer, cfg in configured_layers(model) if cfg.effective_sparsity is not None
             for p in (layer.lora_A, layer.lora_B) if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _write_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """:func:`loranull_kernels.save_adapter` into ``directory``, which may hold other files (a Trainer checkpoint):
    written to a temporary directory beside it, then each file renamed into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".loranull-", dir=directory))
    try:
        _adapter_files.save_adapter(model, tmp / "adapter")
        for name in (_adapter_files.CONFIG_NAME, _adapter_files.WEIGHTS_NAME):
            os.replace(tmp / "adapter" / name, directory / name)
        with open(directory / INDEX_NAME, "w") as f:
            json.dump({"metadata": {"format": _adapter_files.FORMAT, "note": "adapter-only checkpoint: the adapter is in "
                                    f"{_adapter_files.WEIGHTS_NAME}, loaded by loranull_kernels.load_adapter"},
                       "weight_map": {}}, f, indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
    """Adapter-only ``save_pretrained`` (installed by :class:`AdapterCallback`): the package's adapter files."""
    if is_main_process:
        _write_adapter(self, save_directory)


def _is_adapter_checkpoint(path) -> bool:
    return path is not None and (Path(path) / _adapter_files.WEIGHTS_NAME).is_file()


class AdapterCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` for models holding :class:`~loranull_kernels.LoRALinear` adapters.

    ``Trainer(model=model, ..., callbacks=[AdapterCallback()])`` (or :func:`attach`). See the module docstring for
    what it does at each event.

    Args:
        schedule: run :func:`loranull_kernels.after_optimizer_step` after every optimiser step (RoseLoRA).
        log: add ``penalty/<kind>`` (:func:`loranull_kernels.regularize.penalty_values`), ``roselora/density``
            (:func:`rose_density`) and ``roselora/keep_fraction`` (τ of the last step) to every log.
        adapter_only_checkpoints: make ``model.save_pretrained`` write the adapter files only, and restore them on
            ``resume_from_checkpoint`` (needs a ``transformers.PreTrainedModel``; other modules are saved by the
            Trainer as a full state dict, and the callback adds the adapter files beside it in ``on_save``).
        resume_from: the checkpoint directory to restore the adapter from on resume; None: the Trainer's
            ``<output_dir>/checkpoint-<global_step>``, the directory ``resume_from_checkpoint=True`` picks.

    ``load_best_model_at_end`` is not handled: the Trainer finds no model weights in an adapter-only checkpoint
    (it logs that); load the best checkpoint with :func:`loranull_kernels.load_adapter`.

    Raises (at ``on_train_begin``):
        FileNotFoundError: a resumed run (``global_step > 0``) whose checkpoint holds no adapter files.
    """

    def __init__(self, schedule: bool = True, log: bool = True, adapter_only_checkpoints: bool = True,
                 resume_from: str | os.PathLike | None = None):
        self.schedule, self.log, self.adapter_only_checkpoints = schedule, log, adapter_only_checkpoints
        self.resume_from = resume_from
        self._keep_fraction: float | None = None
        self._saved_ignore = None

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, model: nn.Module) -> None:
        """Install the adapter-only ``save_pretrained`` on ``model`` (idempotent). Called at ``on_init_end``;
        :func:`attach` calls it directly. The Trainer's resume loader reads the empty weight index of an
        adapter-only checkpoint and finds every key of the model missing; until ``on_train_begin`` the model's
        ``_keys_to_ignore_on_save`` lists them all, which is the Trainer's sign that they are meant to be absent
        (it then logs no warning). ``on_train_begin`` restores the attribute."""
        if not (self.adapter_only_checkpoints and _has_adapters(model)):
            return
        if isinstance(getattr(type(model), "save_pretrained", None), types.FunctionType) and _PATCHED not in \
                model.__dict__:
            model.save_pretrained = types.MethodType(_save_pretrained, model)
            model.__dict__[_PATCHED] = True
        if self._saved_ignore is None and hasattr(model, "_keys_to_ignore_on_save"):
            self._saved_ignore = (model._keys_to_ignore_on_save,)
            model._keys_to_ignore_on_save = set(model.state_dict().keys())

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.setup(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not _has_adapters(model):
            return
        if self._saved_ignore is not None:
            model._keys_to_ignore_on_save = self._saved_ignore[0]
            self._saved_ignore = None
        enable_penalty_hooks(model)
        if state.global_step > 0:  # resuming
            path = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not _is_adapter_checkpoint(path):
                raise FileNotFoundError(
                    f"AdapterCallback: resuming at step {state.global_step}, but {path} holds no adapter "
                    f"({_adapter_files.WEIGHTS_NAME}); pass AdapterCallback(resume_from=<checkpoint directory>)")
            _adapter_files.load_adapter(model, path)
            logger.info("loranull_kernels: adapter restored from %s", path)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.schedule and model is not None:
            if getattr(args, "fp16", False) and not _gradients_finite(model):
                return  # GradScaler skipped this step (inf/NaN gradients): no importance from them either
            taus = after_optimizer_step(model, state.global_step)  # global_step: the 0-based index of this step
            self._keep_fraction = min(taus.values()) if taus else None

    def on_save(self, args, state, control, model=None, **kwargs):
        if not (self.adapter_only_checkpoints and _has_adapters(model)) or not state.is_world_process_zero:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt) and not _is_adapter_checkpoint(ckpt):  # not a PreTrainedModel: add the adapter
            _write_adapter(model, ckpt)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log or model is None or logs is None or not _has_adapters(model):
            return
        extra = {f"penalty/{k}": v for k, v in penalty_values(model).items()}
        density = rose_density(model)
        if density is not None:
            extra["roselora/density"] = density
            if self._keep_fraction is not None:
                extra["roselora/keep_fraction"] = self._keep_fraction
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def attach(trainer, **kwargs) -> AdapterCallback:
    """Create an :class:`AdapterCallback` (``**kwargs`` are its arguments), set it up on ``trainer.model`` and
    make it the trainer's first callback, so every reporting callback (console, TensorBoard, W&B, ...) receives
    the values it adds to the logs. Returns the callback."""
    callback = AdapterCallback(**kwargs)
    callback.setup(trainer.model)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
