"""CovarianceAccumulator: counts, normalisation, means, non-finite input, and all_reduce over 2 gloo processes."""
import pytest
import torch

import loranull_kernels.backend as backend
from loranull_kernels import reference
from loranull_kernels.covariance_accumulator import CovarianceAccumulator, NonFiniteCalibrationError
from tests.distributed_workers import covariance_all_reduce, rank_batches
from tests.helpers import assert_close, spawn_and_join

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def corda_reference(samples, masks):
    """The LoRA-Null/CorDA hook, one (seq, in) sample at a time, float64: x / |max x|, then Σ xᵀx / n_samples."""
    C = 0
    for x, m in zip(samples, masks):
        x = x.double()[m]
        x = x / x.max().abs()
        C = C + x.t() @ x
    return C / len(samples)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_sums_counts_and_means(backend_name):
    acc = CovarianceAccumulator(19, name="q_proj")
    batches = [torch.randn(3, 7, 19, device=DEVICE), torch.randn(11, 19, device=DEVICE), torch.randn(2, 4, 19, device=DEVICE)]
    masks = [torch.rand(3, 7, device=DEVICE) > 0.3, None, torch.tensor([[True] * 4, [False] * 4], device=DEVICE)]
    masks[0][:, 0] = True
    with backend.use(backend_name):
        for x, m in zip(batches, masks):
            acc.update(x, m)
    expected = torch.zeros(19, 19, dtype=torch.float64)
    for x, m in zip(batches, masks):
        expected = reference.covariance_update(expected, x, m)
    tokens = int(masks[0].sum()) + 11 + 4
    assert acc.tokens == tokens
    assert acc.samples == 3 + 1 + 1  # the all-padding sample does not count
    assert_close(acc.C, expected, torch.float32, "C")
    assert_close(acc.mean(), expected / tokens, torch.float32, "mean")
    assert_close(acc.finalize(), expected / 5, torch.float32, "finalize")
    assert_close(acc.finalize(per="token"), expected / tokens, torch.float32, "finalize per token")


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_per_sample_max_normalisation_matches_reference_code(backend_name):
    x = torch.randn(4, 9, 13, device=DEVICE) * torch.tensor([1.0, 10.0, 0.1, 3.0], device=DEVICE)[:, None, None]
    x[2] = -x[2].abs()  # all-negative sample: signed max is negative, the reference takes its abs
    mask = torch.rand(4, 9, device=DEVICE) > 0.25
    mask[:, 0] = True
    x[~mask] = 1e6  # padding must not set the scale
    acc = CovarianceAccumulator(13, normalize=True)
    with backend.use(backend_name):
        acc.update(x, mask)
    assert_close(acc.finalize(), corda_reference(list(x.cpu()), list(mask.cpu())), torch.float32, "C")


def test_non_finite_batch_raises_and_is_not_added():
    acc = CovarianceAccumulator(8, name="layers.3.mlp.down_proj")
    acc.update(torch.randn(5, 8, device=DEVICE))
    before = (acc.C.clone(), acc.tokens, acc.samples)
    bad = torch.randn(2, 3, 8, device=DEVICE)
    bad[1, 2, 5] = float("nan")
    with pytest.raises(NonFiniteCalibrationError, match="layers.3.mlp.down_proj"):
        acc.update(bad)
    bad[1, 2, 5] = float("inf")
    with pytest.raises(ValueError, match="not added"):
        acc.update(bad)
    assert torch.equal(acc.C, before[0]) and (acc.tokens, acc.samples) == before[1:]
    mask = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    mask[1, 2] = False  # the bad token is padding: fine
    acc.update(bad, mask)
    assert acc.tokens == 5 + 5 and torch.isfinite(acc.C).all()


def test_empty_calibration_set_is_an_error():
    acc = CovarianceAccumulator(4, name="v_proj")
    with pytest.raises(ValueError, match="empty calibration set"):
        acc.mean()
    acc.update(torch.randn(2, 4, device=DEVICE), torch.zeros(2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="empty calibration set"):
        acc.finalize()


def test_bad_input_names_the_layer():
    acc = CovarianceAccumulator(6, name="k_proj")
    with pytest.raises(ValueError, match="k_proj"):
        acc.update(torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="token_mask"):
        acc.update(torch.randn(3, 6, device=DEVICE), torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a floating"):
        acc.update(torch.ones(3, 6, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="dim"):
        CovarianceAccumulator(0)
    with pytest.raises(RuntimeError, match="process group"):
        acc.all_reduce()


def test_c_follows_the_first_batch_device():
    acc = CovarianceAccumulator(5)
    assert acc.device is None
    acc.update(torch.randn(2, 5, device=DEVICE))
    assert acc.C.device.type == DEVICE and acc.C.dtype == torch.float32


def test_all_reduce_over_two_gloo_processes(tmp_path):
    dim, world = 10, 2
    spawn_and_join(covariance_all_reduce, (world, str(tmp_path / "init"), str(tmp_path), dim), nprocs=world)
    expected = torch.zeros(dim, dim, dtype=torch.float64)
    tokens = samples = 0
    for rank in range(world):
        for x, mask in rank_batches(rank, dim):
            expected = reference.covariance_update(expected, x, mask)
            tokens += int(mask.sum())
            samples += int((mask.sum(-1) > 0).sum())
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got["tokens"], got["samples"]) == (tokens, samples)
        assert_close(got["C"], expected, torch.float32, f"C on rank {rank}")
