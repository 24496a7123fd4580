"""The method registry: one module per method, each declaring a :class:`~.base.Method` as ``METHOD`` (initialiser,
pieces, config fields and checks). Everything else (``AdapterConfig`` validation, the regulariser and sparsity
drivers, ``inject``) reads the tables below; nothing else names a method. To add one: write its module and add it to
``MODULES``."""
from __future__ import annotations

from . import kasa, lalora, lora, lora_null, milora, pissa, roselora
from .base import AdapterInit, Method, Option, Regularizer, SparsitySchedule

MODULES = (lora, pissa, milora, lora_null, kasa, roselora, lalora)

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in MODULES}
REGULARIZERS: dict[str, Regularizer] = {m.regularizer.name: m.regularizer for m in METHODS.values()
                                        if m.regularizer is not None}
SPARSITY: dict[str, SparsitySchedule] = {m.sparsity.name: m.sparsity for m in METHODS.values()
                                         if m.sparsity is not None}
OPTIONS: dict[str, Option] = {o.name: o for m in METHODS.values() for o in m.options}


def _check_registry() -> None:
    """Names must not collide: two methods declaring different options, regularisers or schedules under one name
    would silently shadow each other (one piece shared by two methods is fine)."""
    declared: dict[tuple[str, str], set[int]] = {}
    for m in METHODS.values():
        for kind, items in (("option", m.options), ("regularizer", [m.regularizer] if m.regularizer else []),
                            ("sparsity schedule", [m.sparsity] if m.sparsity else [])):
            for item in items:
                declared.setdefault((kind, item.name), set()).add(id(item))
    clashes = sorted(f"{kind} {name!r}" for (kind, name), ids in declared.items() if len(ids) > 1)
    if clashes:
        raise RuntimeError(f"loranull_kernels.methods: {', '.join(clashes)} declared twice, differently")


_check_registry()


def get_method(name: str) -> Method:
    """The method called ``name`` (``ValueError`` listing the known ones otherwise)."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None


__all__ = ["AdapterInit", "Method", "Option", "Regularizer", "SparsitySchedule", "get_method", "METHODS",
           "REGULARIZERS", "SPARSITY", "OPTIONS", "MODULES"]
