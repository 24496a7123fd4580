"""One module per method; each exposes ``METHOD`` (a :class:`~.base.Method`)."""
from . import lora, lora_null, milora, pissa
from .base import AdapterInit, Method

_METHODS = {m.METHOD.name: m.METHOD for m in (lora, pissa, milora, lora_null)}


def get_method(name: str) -> Method:
    """The method called ``name`` (``ValueError`` listing the known ones otherwise)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(_METHODS)}") from None


__all__ = ["AdapterInit", "Method", "get_method"]
