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
  in ``on_train_begin``, after the Trainer has restored its optimiser, scheduler and RNG state. Each checkpoint's
  adapter carries an id that is also saved in the checkpoint's ``trainer_state.json`` (the callback's
  ``ExportableState``), so the adapter restored is the one of the checkpoint the Trainer resumed from, never
  another run's ``checkpoint-N`` in ``output_dir``; :func:`attach` also checks, before the Trainer loads any
  optimiser state, that the checkpoint's adapter is the model's kind (method, r, modules, trainable set).

Models without :class:`~loranull_kernels.LoRALinear` layers (a PEFT model patched with
:func:`loranull_kernels.integrations.peft.patch`) are left to the Trainer: PEFT saves and resumes its own adapter.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import types
import uuid
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .. import adapter_files as _adapter_files
from ..adapter_layers import adapter_layers, configured_layers
from ..regularize import enable_penalty_hooks, penalty_values
from ..sparsity import after_optimizer_step

__all__ = ["AdapterCallback", "attach", "check_checkpoint_fits", "rose_density"]

logger = logging.getLogger(__name__)

_PATCHED = "_loranull_save_pretrained"
INDEX_NAME = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME
# Kept on the model rather than on the callback: the Trainer may replace the callback by a copy built from its saved
# state (restore_callback_states_from_checkpoint), and attach's train() knows the model, not that copy.
_CHECKPOINT_ID = "_loranull_checkpoint_id"  # the id the next adapter checkpoint is written with
_RESUME_PATH = "_loranull_resume_path"  # the checkpoint trainer.train(resume_from_checkpoint=...) resumes from
_SAVED_IGNORE = "_loranull_keys_to_ignore_on_save"  # (the model's own value,) while setup's replaces it
_SCHEDULED = "_loranull_scheduled_step"  # (run, step) the sparsity schedule last ran at: once per step


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


def _refuse_zero3_step_pieces(model: nn.Module) -> None:
    """The penalties (KaSA, LaLoRA) and RoseLoRA's schedule read whole adapter matrices and their gradients at each
    optimizer step. DeepSpeed ZeRO-3 partitions them (``ds_id`` marks its parameters) and its optimizer steps flat
    partitions the penalty hooks never see: they would be skipped silently. Refused, naming the first layer."""
    for name, layer, cfg in configured_layers(model):
        if getattr(layer.lora_A, "ds_id", None) is not None and (cfg.effective_regularizer or cfg.effective_sparsity):
            pieces = [p for p in (cfg.effective_regularizer, cfg.effective_sparsity) if p]
            raise RuntimeError(f"loranull_kernels: adapter {name!r} ({cfg.method!r}) has {' and '.join(pieces)}, "
                               "which need whole adapter matrices at every optimizer step, but DeepSpeed ZeRO-3 partitions "
                               "them: train this method with ZeRO-1/2, DDP or FSDP2, or use a method without a "
                               "regulariser or sparsity schedule (lora, lora_null, milora, pissa) under ZeRO-3")


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
                                    f"{_adapter_files.WEIGHTS_NAME}, loaded by loranull_kernels.load_adapter",
                                    "checkpoint_id": model.__dict__.get(_CHECKPOINT_ID)},
                       "weight_map": {}}, f, indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
    """Adapter-only ``save_pretrained`` (installed by :class:`AdapterCallback`): the package's adapter files."""
    if is_main_process:
        _write_adapter(self, save_directory)


def _is_adapter_checkpoint(path) -> bool:
    return path is not None and (Path(path) / _adapter_files.WEIGHTS_NAME).is_file()


def _checkpoint_id(path) -> str | None:
    """The id an adapter checkpoint was written with (None: none recorded, e.g. written before ids existed)."""
    try:
        with open(Path(path) / INDEX_NAME, encoding="utf-8") as f:
            meta = json.load(f).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return None
    return meta.get("checkpoint_id") if isinstance(meta, dict) else None


def _saved_attributes(state) -> dict:
    """What the checkpoint being resumed recorded about its adapter (this callback's ``ExportableState``)."""
    saved = (getattr(state, "stateful_callbacks", None) or {}).get("AdapterCallback")
    if isinstance(saved, list):  # several AdapterCallbacks: transformers appends each save's states to the list
        saved = saved[-1] if saved else None
    attributes = saved.get("attributes") if isinstance(saved, dict) else None
    return attributes if isinstance(attributes, dict) else {}


def check_checkpoint_fits(model: nn.Module, path) -> None:
    """ValueError naming the checkpoint unless its adapter is the kind ``model`` holds: the same method, r, scaling,
    trainable set and modules, so that the Trainer's optimiser state (saved per trainable parameter) fits the model.
    Checked from the adapter's JSON alone, before the Trainer loads anything."""
    if not _is_adapter_checkpoint(path):
        return  # the Trainer and on_train_begin report what is missing
    cfg, modules = _adapter_files.read_adapter_config(path)
    layers = dict(adapter_layers(model))
    mine = next(iter(layers.values())).adapter_config

    def kind(c) -> str:
        return f"method {c.method!r}, r={c.r}, scaling={c.scaling:g}, freeze_A={c.freeze_A}, train_bias={c.train_bias}"

    same = (cfg.method == mine.method and cfg.r == mine.r and math.isclose(cfg.scaling, mine.scaling, rel_tol=1e-12)
            and cfg.freeze_A == mine.freeze_A and cfg.train_bias == mine.train_bias)
    if not same or set(modules) != set(layers):
        where = "" if set(modules) == set(layers) else (
            f"; modules saved but not adapted here: {sorted(set(modules) - set(layers))[:3]}, adapted here but not "
            f"saved: {sorted(set(layers) - set(modules))[:3]}")
        raise ValueError(f"resume_from_checkpoint={str(path)!r}: its adapter ({kind(cfg)}) is not the kind this model "
                         f"holds ({kind(mine)}){where}, so the checkpoint's optimiser state cannot fit this model; "
                         "inject the checkpoint's configuration, or start without resuming")


class AdapterCallback(TrainerCallback, ExportableState):
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

    Several ``AdapterCallback`` on one Trainer run the schedule once per step (the first one to see the step).

    Raises (at ``on_train_begin``):
        FileNotFoundError: a resumed run (``global_step > 0``) whose checkpoint holds no adapter files.
        ValueError: the adapter found is not the one saved with the checkpoint the Trainer resumed from (another
            run's ``checkpoint-N``, or ``resume_from`` naming another checkpoint).
    """

    def __init__(self, schedule: bool = True, log: bool = True, adapter_only_checkpoints: bool = True,
                 resume_from: str | os.PathLike | None = None):
        for name, flag in (("schedule", schedule), ("log", log), ("adapter_only_checkpoints", adapter_only_checkpoints)):
            if not isinstance(flag, bool):  # "no" is truthy: a string here would mean its opposite
                raise TypeError(f"AdapterCallback: {name} must be a bool, got {flag!r}")
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(f"AdapterCallback: resume_from must be a path or None, got {resume_from!r}")
        self.schedule, self.log, self.adapter_only_checkpoints = schedule, log, adapter_only_checkpoints
        self.resume_from = resume_from
        self._keep_fraction: float | None = None
        self._run = uuid.uuid4().hex[:12]
        # The id and directory of the checkpoint saved last: saved in its trainer_state.json by the Trainer.
        self.checkpoint_id: str | None = None
        self.checkpoint_dir: str | None = None

    def state(self) -> dict:
        """What the Trainer saves of this callback in each checkpoint (``ExportableState``)."""
        return {"args": {"schedule": self.schedule, "log": self.log,
                         "adapter_only_checkpoints": self.adapter_only_checkpoints,
                         "resume_from": None if self.resume_from is None else os.fspath(self.resume_from)},
                "attributes": {"checkpoint_id": self.checkpoint_id, "checkpoint_dir": self.checkpoint_dir}}

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
        if _SAVED_IGNORE not in model.__dict__ and hasattr(model, "_keys_to_ignore_on_save"):
            model.__dict__[_SAVED_IGNORE] = (model._keys_to_ignore_on_save,)
            model._keys_to_ignore_on_save = set(model.state_dict().keys())

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.setup(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        callbacks = getattr(state, "stateful_callbacks", None)
        if isinstance(callbacks, dict):
            # Resuming from a trainer_state.json without this callback's entry (written before it was an
            # ExportableState, or by a run without it): the Trainer's next checkpoint save indexes the entry
            # without a default and would raise KeyError.
            callbacks.setdefault(type(self).__name__, self.state())
        if model is None or not _has_adapters(model):
            return
        saved = model.__dict__.pop(_SAVED_IGNORE, None)
        if saved is not None:
            model._keys_to_ignore_on_save = saved[0]
        _refuse_zero3_step_pieces(model)
        enable_penalty_hooks(model)
        if state.global_step > 0:  # resuming
            path = self._checkpoint_to_restore(args, state, model)
            _adapter_files.load_adapter(model, path)
            logger.info("loranull_kernels: adapter restored from %s", path)

    def _checkpoint_to_restore(self, args, state, model) -> str:
        """The adapter checkpoint of the Trainer's resumed state: the one whose id its trainer_state.json holds,
        looked for where attach's train() saw it, in ``resume_from``, where it was saved, in
        ``<output_dir>/checkpoint-<step>``. Without an id (a checkpoint from before ids) the first adapter found."""
        step = state.global_step
        saved = _saved_attributes(state)
        expected = saved.get("checkpoint_id")
        exact = model.__dict__.get(_RESUME_PATH)
        default = os.path.join(args.output_dir, f"checkpoint-{step}")
        if exact is not None:
            candidates = [exact]
        elif self.resume_from is not None:
            candidates = [os.fspath(self.resume_from)]
        else:
            candidates = [p for p in (saved.get("checkpoint_dir"), default) if isinstance(p, str)]
        candidates = list(dict.fromkeys(candidates))
        found = [p for p in candidates if _is_adapter_checkpoint(p)]
        for path in found:
            if expected is None or _checkpoint_id(path) == expected:
                return path
        if not found:
            raise FileNotFoundError(
                f"AdapterCallback: resuming at step {step}, but {' and '.join(candidates)} hold(s) no adapter "
                f"({_adapter_files.WEIGHTS_NAME}); pass AdapterCallback(resume_from=<checkpoint directory>)")
        raise ValueError(
            f"AdapterCallback: resuming at step {step} from a checkpoint whose adapter has id {expected!r} (saved in "
            f"{saved.get('checkpoint_dir')}), but {' and '.join(found)} hold(s) another adapter (another run's "
            "checkpoint?); pass AdapterCallback(resume_from=<the checkpoint directory you resume from>), or use "
            "attach(trainer), which sees the directory train() resumes from")

    def _stamp(self, args, state, model) -> None:
        """The id and directory the next checkpoint's adapter is saved under (before the Trainer saves one)."""
        self.checkpoint_id = f"{self._run}-{state.global_step}"
        self.checkpoint_dir = os.path.abspath(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        if model is not None:
            model.__dict__[_CHECKPOINT_ID] = self.checkpoint_id

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._stamp(args, state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._stamp(args, state, model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.schedule and model is not None:
            step = (id(state), state.global_step)
            if model.__dict__.get(_SCHEDULED) == step:
                return  # another AdapterCallback of this Trainer ran this step's schedule already
            model.__dict__[_SCHEDULED] = step
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
    the values it adds to the logs. Returns the callback.

    A trainer that already has an ``AdapterCallback`` keeps that one (moved first): a second would run the
    schedule twice. ``trainer.train(resume_from_checkpoint=...)`` then checks the checkpoint's adapter against the
    model before the Trainer loads its optimiser state (:func:`check_checkpoint_fits`), and restores the adapter of
    that very directory.

    Raises:
        ValueError: the trainer's ``AdapterCallback`` has other settings than ``**kwargs``.
    """
    handler = trainer.callback_handler
    existing = [cb for cb in handler.callbacks if isinstance(cb, AdapterCallback)]
    if existing:
        callback = existing[0]
        has, wanted = callback.state()["args"], AdapterCallback(**kwargs).state()["args"]
        differ = [f"{k}={has[k]!r}" for k in kwargs if has[k] != wanted[k]]
        if differ:
            raise ValueError(f"attach: the trainer already has an AdapterCallback with other settings "
                             f"({', '.join(differ)}); configure that one, or remove it before attaching")
        handler.callbacks.remove(callback)
    else:
        callback = AdapterCallback(**kwargs)
    callback.setup(trainer.model)
    handler.callbacks.insert(0, callback)
    _check_before_resuming(trainer)
    return callback


def _check_before_resuming(trainer) -> None:
    """Wrap ``trainer.train`` (once): the checkpoint to resume from is checked against the model, and recorded for
    :meth:`AdapterCallback.on_train_begin`, before the Trainer restores anything from it."""
    if getattr(trainer, "_loranull_train_checked", False):
        return
    train = trainer.train

    def checked_train(resume_from_checkpoint=None, *args, **kwargs):
        from transformers.trainer_utils import get_last_checkpoint

        model, path = trainer.model, resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(trainer.args.output_dir)  # None: the Trainer raises its own error
        if isinstance(path, (str, os.PathLike)) and _has_adapters(model):
            check_checkpoint_fits(model, path)
            model.__dict__[_RESUME_PATH] = os.fspath(path)
        try:
            return train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if model is not None:
                model.__dict__.pop(_RESUME_PATH, None)

    trainer.train = checked_train
    trainer._loranull_train_checked = True
