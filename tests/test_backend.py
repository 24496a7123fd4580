"""Backend selection and the capability report."""
import pytest
import torch

import loranull_kernels as lk


def test_use_overrides_and_restores():
    before = lk.backend.requested()
    with lk.backend.use("torch"):
        assert lk.backend.select(torch.device("cpu"), torch.float32) == "torch"
        with lk.backend.use("auto"):
            assert lk.backend.requested() == "auto"
        assert lk.backend.requested() == "torch"
    assert lk.backend.requested() == before


def test_env_var(monkeypatch):
    monkeypatch.setenv("LORANULL_BACKEND", "torch")
    assert lk.backend.select(torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv("LORANULL_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="LORANULL_BACKEND"):
        lk.backend.requested()
    with pytest.raises(ValueError, match="backend must be one of"):
        with lk.backend.use("numpy"):
            pass


def test_auto_on_cpu_follows_interpreter(monkeypatch):
    monkeypatch.delenv("LORANULL_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert lk.backend.select(torch.device("cpu"), torch.float32) == "torch"
    with lk.backend.use("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lk.backend.select(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lk.backend.select(torch.device("cpu"), torch.float32) == "triton"
    assert lk.backend.select(torch.device("cpu"), torch.float64) == "torch"


def test_report_lists_devices_and_extension(capsys):
    text = lk.backend.report()
    assert "triton" in text and "cpu" in text and "CUDA extension" in text
    assert capsys.readouterr().out.strip() == text.strip()


def test_poisoned_outputs_are_nan(monkeypatch):
    monkeypatch.setenv("LORANULL_POISON_OUTPUTS", "1")
    assert torch.isnan(lk.backend.empty(3, 4, dtype=torch.float32, device=torch.device("cpu"))).all()
