"""Fixtures of the integration tests.

Each tool's tests skip where the tool is not installed (the main suite's venv has only PEFT). The integration stage
of CI runs them in that tool's own venv with ``LORANULL_REQUIRE=<module>``: there a missing or broken install is a
failure, never a silent skip (``require``).
"""
import importlib
import os

import pytest


def require(module: str):
    """``pytest.importorskip(module)``, except that it imports (and so fails loudly) when ``module`` is listed in
    the comma-separated ``LORANULL_REQUIRE``."""
    if module in os.environ.get("LORANULL_REQUIRE", "").split(","):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def count_calls(monkeypatch, module) -> list:
    """Replace ``module.lora_linear`` by a wrapper that appends to the returned list on every call (the calls of the
    patched layers that reach the fused op)."""
    calls = []
    real = module.lora_linear
    monkeypatch.setattr(module, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of patched PEFT layers that reach the fused op (a list, one entry per call)."""
    from loranull_kernels.integrations import peft as lkpeft

    return count_calls(monkeypatch, lkpeft)
