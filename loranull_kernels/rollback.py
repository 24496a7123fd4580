"""Undo for the in-place edits of :func:`~loranull_kernels.inject` (and of :func:`~loranull_kernels.load_adapter` on
an original model): every module swapped, every parameter's ``requires_grad``, every module's train/eval mode and the
penalty hooks are recorded, so that any exception, ``KeyboardInterrupt`` included, puts the model back as it was.

The replaced modules are kept until the edit succeeds: putting them back is then a matter of references (no
allocation, so undoing cannot fail for lack of memory), and the model gets its very own modules and parameters back,
bit for bit. The price is memory: until the edit returns, the replaced layers' weights live beside the new ones.
"""
from __future__ import annotations

from torch import nn

from .regularize import disable_penalty_hooks, penalty_hooks_enabled


class Rollback:
    """``with Rollback(model) as rollback:`` around an edit of ``model``; swap modules with :meth:`swap`. On an
    exception (any ``BaseException``) the model is restored before it propagates; on success nothing is undone.

    ``enabled=False`` records nothing and undoes nothing (each replaced module is freed at once): the edit is then
    not transactional, for models where the replaced layers' weights cannot stay in memory until it ends."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.model, self.enabled = model, enabled
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()] if enabled else []
        self._training = [(m, m.training) for m in model.modules()] if enabled else []
        self._hooks_were_on = penalty_hooks_enabled(model)
        self._swapped: list[tuple[str, nn.Module]] = []

    def swap(self, name: str, module: nn.Module) -> None:
        """``model.set_submodule(name, module)``, keeping the module it replaces for :meth:`undo`."""
        if self.enabled:
            self._swapped.append((name, self.model.get_submodule(name)))
        self.model.set_submodule(name, module)

    def undo(self) -> None:
        """Put back every replaced module (last swapped first), every ``requires_grad`` and train/eval mode, and the
        penalty hooks' state."""
        while self._swapped:
            name, original = self._swapped.pop()
            self.model.set_submodule(name, original)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        for m, mode in self._training:
            m.training = mode
        if not self._hooks_were_on:
            disable_penalty_hooks(self.model)

    def __enter__(self) -> "Rollback":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.enabled:
            self.undo()
        self._swapped.clear()  # on success: release the replaced modules now
        self._requires_grad.clear()
        self._training.clear()
        return False
