"""DDP (gloo, 2 CPU processes) trains injected adapters to the parameters one process reaches on the whole batch.

Calibration across processes (covariance all-reduce) is covered in tests/test_calibrate.py.
"""

import pytest
import torch

import loranull_kernels as lk
from tests.ddp_workers import adapted_llama, batch, ddp_worker, train
from tests.helpers import assert_close, free_port, spawn_and_join


@pytest.mark.slow  # two fresh interpreters import torch and transformers
def test_ddp_two_processes_equal_one_process(tmp_path):
    spawn_and_join(ddp_worker, (2, free_port(), str(tmp_path)), nprocs=2)
    with lk.backend.use("torch"):
        start = [p.detach().clone() for p in adapted_llama().parameters() if p.requires_grad]
        expected = train(adapted_llama(), batch())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]) == len(expected) == 12
    assert any(not torch.allclose(e, s) for e, s in zip(expected, start))  # training moved the adapters
    for r, got in enumerate(ranks):
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e.detach(), torch.float32, f"rank {r} parameter {i}", tol=1e-5)
