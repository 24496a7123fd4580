"""Worker functions for the multi-process tests (a module of its own so torch.multiprocessing can import them)."""
import torch
import torch.distributed as dist


def rank_batches(rank: int, dim: int):
    """The calibration batches of one rank: x (batch, seq, dim) and a token mask, reproducible from the rank."""
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for batch, seq in ((2, 5 + rank), (1, 3)):
        x = torch.randn(batch, seq, dim, generator=g)
        mask = torch.rand(batch, seq, generator=g) > 0.3
        out.append((x, mask))
    return out


def covariance_all_reduce(rank: int, world_size: int, init_file: str, out_dir: str, dim: int):
    from loranull_kernels.covariance_accumulator import CovarianceAccumulator

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        acc = CovarianceAccumulator(dim, name=f"rank{rank}")
        for x, mask in rank_batches(rank, dim):
            acc.update(x, mask)
        acc.all_reduce()
        torch.save({"C": acc.C, "tokens": acc.tokens, "samples": acc.samples}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
