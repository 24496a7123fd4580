"""Backend selection and the capability report."""
import importlib

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


def test_select_among_an_ops_backends(monkeypatch):
    # rsvd's backends are ("cuda", "torch"): a request for a backend the op lacks counts as auto, one it has but
    # cannot run here raises and says why.
    monkeypatch.delenv("LORANULL_BACKEND", raising=False)
    cpu, rsvd_backends = torch.device("cpu"), ("cuda", "torch")
    assert set(lk.backend.BACKENDS) == {"triton", "cuda", "torch"}
    assert lk.backend.select(cpu, torch.float32, among=rsvd_backends) == "torch"
    with lk.backend.use("triton"):
        assert lk.backend.select(cpu, torch.float32, among=rsvd_backends) == "torch"
    with lk.backend.use("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' was requested but .*CUDA tensors"):
            lk.backend.select(cpu, torch.float32, among=rsvd_backends)
        assert lk.backend.select(cpu, torch.float64) == "torch"


@pytest.mark.parametrize("op", ["lora_linear", "covariance", "rose_prune", "rsvd"])
def test_every_op_dispatches_among_registered_backends(op):
    backends = importlib.import_module(f"loranull_kernels.ops.{op}").IMPLEMENTATIONS
    assert set(backends) <= set(lk.backend.BACKENDS) and list(backends)[-1] == "torch", backends
