"""The method registry: one module per method, each declaring a :class:`~.base.Method` as ``METHOD`` (initialiser,
pieces, config fields and checks). Everything else (``AdapterConfig`` validation, the regulariser and sparsity
drivers, ``inject``, adapter files) reads the tables below; nothing else names a method. To add one: write its
module and add it to ``MODULES`` (or, from user code, :func:`register` its ``Method``). docs/methods.md#adding-a-method
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from . import kasa, lalora, lora, lora_null, milora, pissa, roselora
from .base import AdapterInit, Method, Option, Regularizer, SparsitySchedule, check_init, survives_json

MODULES = (lora, pissa, milora, lora_null, kasa, roselora, lalora)
BUILT_IN = tuple(m.METHOD.name for m in MODULES)

METHODS: dict[str, Method] = {}
REGULARIZERS: dict[str, Regularizer] = {}
SPARSITY: dict[str, SparsitySchedule] = {}
OPTIONS: dict[str, Option] = {}
# Names an option may not take: AdapterConfig's own fields and attributes (an option named ``r`` would shadow the
# field in every config, one named ``scaling`` would never be readable). config.py adds them when it is imported;
# the registry cannot import the config (the config reads the registry).
RESERVED: set[str] = set()


def _claims(method: Method):
    yield from ((OPTIONS, o) for o in method.options)
    if method.regularizer is not None:
        yield REGULARIZERS, method.regularizer
    if method.sparsity is not None:
        yield SPARSITY, method.sparsity


def _check_declarations(method: Method) -> None:
    """Names and defaults that would break configs or adapter files later, refused when the method registers."""
    name = method.name
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a method's name must be a non-empty string without surrounding spaces, got {name!r}")
    if not callable(method.initialize):
        raise TypeError(f"method {name!r}: initialize must be callable, got {type(method.initialize).__name__}")
    for kind, piece in (("regularizer", method.regularizer), ("sparsity", method.sparsity)):
        if piece is not None and (not isinstance(piece.name, str) or not piece.name or piece.name == "auto"):
            raise ValueError(f"method {name!r}: its {kind}'s name must be a non-empty string other than 'auto' (which "
                             f"AdapterConfig.{kind} reserves for a method's own piece), got {piece.name!r}")
    for opt in method.options:
        if not isinstance(opt, Option):
            raise TypeError(f"method {name!r}: options must be Option objects, got {type(opt).__name__}")
        if not isinstance(opt.name, str) or not opt.name.isidentifier():
            raise ValueError(f"method {name!r}: option name {opt.name!r} is not an identifier (AdapterConfig reads it "
                             "as an attribute and a keyword)")
        if opt.name in RESERVED:
            raise ValueError(f"method {name!r}: option {opt.name!r} is a name AdapterConfig uses itself (a field or an "
                             "attribute); rename the option")
        if not opt.valid(opt.default):
            raise ValueError(f"method {name!r}: option {opt.name!r} has a default {opt.default!r} its own check "
                             f"refuses ({opt.expected})")
        if not survives_json(opt.default):
            raise ValueError(f"method {name!r}: option {opt.name!r} has a default {opt.default!r} that does not come "
                             "back from JSON as itself (use a list, not a tuple; str keys): adapter files saved with "
                             "it could not be loaded")


def _checked(method: Method):
    """``method.initialize`` whose result is checked (:func:`~.base.check_init`) before the layer copies it."""
    initialize = method.initialize

    @functools.wraps(initialize)
    def checked(weight, r, scaling, config, covariance=None, generator=None):
        init = initialize(weight, r, scaling, config, covariance=covariance, generator=generator)
        check_init(method.name, init, weight, r)
        if not method.rewrites_base and init.weight is not weight and not torch.equal(init.weight, weight):
            # adapter files would fingerprint the changed weight as the original one, and never load back
            raise ValueError(f"method {method.name!r}: the initialiser changed the base weight, but the method does "
                             "not declare rewrites_base=True")
        return init

    return checked


def register(method: Method) -> Method:
    """Add ``method`` (and the pieces and config fields it declares) to the registry. Returns the registered
    method: ``method`` with its initialiser's results checked (shapes, dtypes) before any layer uses them.

    Raises:
        TypeError: ``method`` is not a :class:`Method` (or its options are not :class:`Option`).
        ValueError: its name is empty or taken; it declares an option named like an ``AdapterConfig`` field or
            attribute (``r``, ``scaling``...), one whose default fails its own check or does not survive JSON, or
            an option, regulariser or schedule under a name another method declared differently (one piece object
            shared by two methods is fine). Nothing is added then.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register needs a Method (loranull_kernels.methods.Method(name, initialize, ...)), got "
                        f"{type(method).__name__} {method!r}")
    _check_declarations(method)
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    for table, item in _claims(method):
        if table.get(item.name, item) is not item:
            raise ValueError(f"method {method.name!r} declares {item.name!r}, which another method declares "
                             "differently")
    stored = dataclasses.replace(method, initialize=_checked(method))
    METHODS[method.name] = stored
    for table, item in _claims(stored):
        table[item.name] = item
    return stored


def unregister(name: str) -> None:
    """Remove the method ``name`` and whatever it declared that no remaining method declares too.

    Raises:
        ValueError: no method of that name is registered, or it is a built-in one (models, adapter files and other
            methods' compositions rely on those).
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"no method named {name!r} is registered; registered: {sorted(METHODS)}")
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in method: it cannot be unregistered")
    method = METHODS.pop(name)
    kept = {id(item) for m in METHODS.values() for _, item in _claims(m)}
    for table, item in _claims(method):
        if id(item) not in kept:
            table.pop(item.name, None)


for _module in MODULES:
    register(_module.METHOD)


def get_method(name: str) -> Method:
    """The method called ``name`` (``ValueError`` listing the known ones otherwise)."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None


__all__ = ["AdapterInit", "Method", "Option", "Regularizer", "SparsitySchedule", "get_method", "register",
           "unregister", "METHODS", "REGULARIZERS", "SPARSITY", "OPTIONS", "MODULES", "BUILT_IN", "RESERVED"]
