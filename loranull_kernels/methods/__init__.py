"""The method registry: one module per method, each declaring a :class:`~.base.Method` as ``METHOD`` (initialiser,
pieces, config fields and checks). Everything else (``AdapterConfig`` validation, the regulariser and sparsity
drivers, ``inject``, adapter files) reads the tables below; nothing else names a method. To add one: write its
module and add it to ``MODULES`` (or, from user code, :func:`register` its ``Method``). docs/methods.md#adding-a-method
"""
from __future__ import annotations

from . import kasa, lalora, lora, lora_null, milora, pissa, roselora
from .base import AdapterInit, Method, Option, Regularizer, SparsitySchedule

MODULES = (lora, pissa, milora, lora_null, kasa, roselora, lalora)

METHODS: dict[str, Method] = {}
REGULARIZERS: dict[str, Regularizer] = {}
SPARSITY: dict[str, SparsitySchedule] = {}
OPTIONS: dict[str, Option] = {}


def _claims(method: Method):
    yield from ((OPTIONS, o) for o in method.options)
    if method.regularizer is not None:
        yield REGULARIZERS, method.regularizer
    if method.sparsity is not None:
        yield SPARSITY, method.sparsity


def register(method: Method) -> Method:
    """Add ``method`` (and the pieces and config fields it declares) to the registry.

    Raises:
        ValueError: its name is taken, or it declares an option, regulariser or schedule under a name another
            method declared differently (one piece object shared by two methods is fine). Nothing is added then.
    """
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    for table, item in _claims(method):
        if table.get(item.name, item) is not item:
            raise ValueError(f"method {method.name!r} declares {item.name!r}, which another method declares "
                             "differently")
    METHODS[method.name] = method
    for table, item in _claims(method):
        table[item.name] = item
    return method


def unregister(name: str) -> None:
    """Remove the method ``name`` and whatever it declared that no remaining method declares too."""
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
           "unregister", "METHODS", "REGULARIZERS", "SPARSITY", "OPTIONS", "MODULES"]
