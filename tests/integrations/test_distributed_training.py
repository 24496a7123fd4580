"""DDP and FSDP2 (torch.distributed.fsdp.fully_shard), gloo, 2 CPU processes: KaSA + RoseLoRA adapters trained with
the penalty from the penalty hooks and the masks from after_optimizer_step reach the parameters and masks of one
process on the whole batch (each penalty counted once per step, not once per rank); under FSDP2 the frozen base
and the adapters are sharded DTensors."""
import pytest
import torch

import loranull_kernels as lk
from tests.helpers import assert_close, free_port, spawn_and_join
from tests.integrations.distributed_training_workers import adapted_llama, adapter_state, batch, train, worker


@pytest.mark.slow  # two fresh interpreters import torch and transformers
def test_ddp_and_fsdp2_equal_one_process(tmp_path):
    spawn_and_join(worker, (2, free_port(), str(tmp_path)), nprocs=2)
    with lk.backend.use("torch"):
        start = adapter_state(adapted_llama())
        model = adapted_llama()
        train(model, batch())
        expected = adapter_state(model)
        without_penalty = adapted_llama()
        lk.regularize.disable_penalty_hooks(without_penalty)
        train(without_penalty, batch())
    masks = [n for n in expected if n.endswith(("mask_A", "mask_B"))]
    assert len(masks) == 12 and all(expected[n].float().mean() == 0.5 for n in masks)
    trained = [n for n in expected if n not in masks]
    assert max((expected[n] - start[n]).abs().max().item() for n in trained) > 1e-2
    assert max((expected[n] - adapter_state(without_penalty)[n]).abs().max().item() for n in trained) > 1e-4, \
        "the penalty changes the result, so counting it twice would show"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r, result in enumerate(ranks):
        assert result["sharded"] == {"weight": ("DTensor", (32, 64), (64, 64)), "lora_A": ("DTensor", (2, 64), (4, 64))}
        for run in ("ddp", "fsdp2"):
            got = result[run]
            assert got.keys() == expected.keys()
            for n in masks:
                assert torch.equal(got[n], expected[n]), f"rank {r} {run} {n}"
            for n in trained:
                assert_close(got[n], expected[n], torch.float32, f"rank {r} {run} {n}", tol=1e-5)
    assert ranks[0]["penalty"]["kasa"] == pytest.approx(ranks[1]["penalty"]["kasa"], rel=1e-6)
