"""What the patching integrations share: give a layer an instance ``forward`` that runs the fused op when its state
allows and the library's own forward otherwise, log each reason for falling back once per layer, and undo.

An instance attribute shadows the class's ``forward`` without touching the class, so other models of the same
library in the process are unaffected, and deleting the attribute restores the library's method exactly.
"""
from __future__ import annotations

import logging
import types
from typing import Callable

import torch
from torch import nn

_FLAG = "_loranull_patched"
_LOGGED = "_loranull_logged_reasons"
_NAME = "_loranull_name"


def set_forward(module: nn.Module, name: str, reason: Callable[..., str | None],
                fused: Callable[..., torch.Tensor], logger: logging.Logger, library: str) -> bool:
    """Give ``module`` a forward that calls ``fused(module, x)`` when ``reason(module, x, args, kwargs)`` is None
    and the class's own forward otherwise, logging each reason once (``"<library> layer <name> runs <library>'s own
    forward: <reason>"``). Returns False (and changes nothing) when the module is already patched."""
    if module.__dict__.get(_FLAG, False):
        return False

    def forward(self, x, *args, **kwargs):
        why = reason(self, x, args, kwargs)
        if why is None:
            return fused(self, x)
        # Not while torch.compile traces: a logging call would break the graph (the eager calls log it)
        seen = None if torch.compiler.is_compiling() else self.__dict__.setdefault(_LOGGED, set())
        if seen is not None and why not in seen:
            seen.add(why)
            logger.info("loranull_kernels: %s layer %s runs %s's own forward: %s", library,
                        getattr(self, _NAME, "?"), library, why)
        return type(self).forward(self, x, *args, **kwargs)

    module.__dict__[_NAME] = name
    module.forward = types.MethodType(forward, module)
    module.__dict__[_FLAG] = True
    return True


def restore(model: nn.Module) -> nn.Module:
    """Remove every forward :func:`set_forward` gave a module of ``model``. Returns ``model``."""
    for module in model.modules():
        if module.__dict__.pop(_FLAG, False):
            del module.forward
            module.__dict__.pop(_LOGGED, None)
            module.__dict__.pop(_NAME, None)
    return model


def is_patched(module: nn.Module) -> bool:
    """Whether :func:`set_forward` replaced this module's forward."""
    return bool(module.__dict__.get(_FLAG, False))
