"""DeepSpeed ZeRO-3, gloo, 2 CPU processes, through the HF Trainer: ``lk.inject`` refuses a ZeRO-3-partitioned
model with the way out, and that way out (inject into the model built without zero.Init, then let the Trainer's
DeepSpeed engine partition it) trains the adapters through the fused op to the parameters one process reaches;
AdapterCallback refuses a method whose penalty or sparsity schedule needs whole matrices at each step (KaSA)."""
import pytest
import torch

from tests.integrations.conftest import require

require("deepspeed")

import loranull_kernels as lk  # noqa: E402
from tests.helpers import assert_close, free_port, spawn_and_join  # noqa: E402
from tests.integrations.deepspeed_workers import adapted_llama, adapter_state, train, worker  # noqa: E402


@pytest.mark.slow  # two fresh interpreters import torch, transformers and deepspeed
def test_zero3_trainer_two_processes_equal_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    spawn_and_join(worker, (2, free_port(), str(tmp_path)), nprocs=2, timeout_s=600)
    with lk.backend.use("torch"):
        model = adapted_llama()
        start = adapter_state(model)
        losses = train(model, str(tmp_path / "one"), 1)
        expected = adapter_state(model)
    assert max((expected[n] - start[n]).abs().max().item() for n in expected) > 1e-3  # training moved the adapters
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r, got in enumerate(ranks):
        assert "partitioned by DeepSpeed ZeRO-3" in got["refusal"] and "TrainingArguments" in got["refusal"]
        # the engine partitioned the adapted model, the base and the adapters alike
        assert got["partitioned"] == {"weight": (0,), "ds": True, "lora_A": True}
        assert "'kasa'" in got["kasa_refusal"] and "ZeRO-3 partitions them" in got["kasa_refusal"]
        assert got["fused_calls"] >= 3 * 2 * 3, "every adapted layer must run the fused op in every step"
        assert got["losses"] == pytest.approx(losses, rel=1e-4)
        assert got["state"].keys() == expected.keys()
        for n in expected:
            assert_close(got["state"][n], expected[n], torch.float32, f"rank {r} {n}", tol=1e-4)
