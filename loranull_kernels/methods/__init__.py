"""One module per method; each exposes ``METHOD`` (a :class:`~.base.Method`), and the methods that bring a
regulariser or a sparsity schedule expose its piece functions too (``kasa``, ``lalora``: ``penalty``; ``roselora``:
``after_step``). :class:`~loranull_kernels.AdapterConfig` says which pieces a layer uses."""
from . import kasa, lalora, lora, lora_null, milora, pissa, roselora
from .base import AdapterInit, Method

_METHODS = {m.METHOD.name: m.METHOD for m in (lora, pissa, milora, lora_null, kasa, roselora, lalora)}
REGULARIZERS = {"kasa": kasa, "lalora": lalora}
SPARSITY = {"roselora": roselora}


def get_method(name: str) -> Method:
    """The method called ``name`` (``ValueError`` listing the known ones otherwise)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(_METHODS)}") from None


__all__ = ["AdapterInit", "Method", "get_method", "REGULARIZERS", "SPARSITY"]
