"""bitsandbytes, only where a model already uses it: a kind never imports it for a model that holds none of its
layers (it is an optional dependency, the ``quant`` extra)."""
from __future__ import annotations

import sys


def module():
    """The imported ``bitsandbytes`` module, or None when nothing imported it (then no layer can be one of its)."""
    return sys.modules.get("bitsandbytes")
