"""Fixtures of the integration tests."""
import pytest


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of patched PEFT layers that reach the fused op (a list, one entry per call)."""
    from loranull_kernels.integrations import peft as lkpeft

    calls = []
    real = lkpeft.lora_linear
    monkeypatch.setattr(lkpeft, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls
