"""LLaMA-Factory: train its LoRA runs on the fused op.

LLaMA-Factory builds a PEFT LoRA model and trains it with a ``transformers.Trainer`` subclass; its Python entry
point ``llamafactory.train.tuner.run_exp(args, callbacks=[...])`` hands extra callbacks to that Trainer. Its YAML
config has no field for a callback or a plugin path, so a YAML run goes through this module's launcher instead of
``llamafactory-cli train``, with the same file::

    python -m loranull_kernels.integrations.llamafactory train config.yaml      # = llamafactory-cli train config.yaml

From Python::

    from llamafactory.train.tuner import run_exp
    from loranull_kernels.integrations.llamafactory import PatchCallback
    run_exp(dict(...), callbacks=[PatchCallback()])

:class:`PatchCallback` runs :func:`loranull_kernels.integrations.peft.patch` on the Trainer's model when training
begins (after LLaMA-Factory attached the adapters and the Trainer wrapped the model), so every PEFT LoRA linear
layer runs the fused op whenever its state allows (see :mod:`loranull_kernels.integrations.peft`). Tested with
llamafactory 0.9.5 (peft 0.18.1, transformers 4.57.6); ``LLAMAFACTORY_TESTED``.

This module imports transformers (for ``TrainerCallback``) and PEFT; LLaMA-Factory itself only when the launcher
runs.
"""
from __future__ import annotations

import sys

from transformers import TrainerCallback

from . import peft as _lkpeft

__all__ = ["PatchCallback", "run_exp", "main", "LLAMAFACTORY_TESTED"]

LLAMAFACTORY_TESTED = (">=0.9.5", "<0.10")


class PatchCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that patches the Trainer's PEFT model onto the fused op at
    ``on_train_begin``. Raises ``ValueError`` when the model holds no PEFT LoRA linear layer (``finetuning_type``
    other than ``lora``): the fused op would never run, which a user who asked for it should hear about."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        _lkpeft.patch_required(model, "loranull_kernels.integrations.llamafactory.PatchCallback",
                               "use finetuning_type: lora, or leave out PatchCallback")


def run_exp(args: dict | None = None, callbacks: list | None = None) -> None:
    """``llamafactory.train.tuner.run_exp(args, callbacks)`` with a :class:`PatchCallback` added (unless one is
    there). ``args``: LLaMA-Factory's arguments as a dict, or None to read them as ``llamafactory-cli`` does (a YAML
    / JSON file named on the command line, then ``key=value`` overrides)."""
    from llamafactory.train.tuner import run_exp as _run_exp

    callbacks = list(callbacks or [])
    if not any(isinstance(c, PatchCallback) for c in callbacks):
        callbacks.append(PatchCallback())
    _run_exp(args, callbacks=callbacks)


def main(argv: list[str] | None = None) -> int:
    """``python -m loranull_kernels.integrations.llamafactory train config.yaml [key=value ...]``: LLaMA-Factory's
    ``train`` command on the fused op."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train" or len(argv) < 2:
        print("usage: python -m loranull_kernels.integrations.llamafactory train CONFIG.yaml [key=value ...]",
              file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0]] + argv[1:]  # LLaMA-Factory's read_args reads the config path from sys.argv[1]
    run_exp(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
