"""Worker of the two-process calibration test (a module of its own so torch.multiprocessing.spawn can import it)."""
import datetime
import os

import torch
import torch.distributed as dist


def calibrate_worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ["LORANULL_BACKEND"] = "torch"
    from loranull_kernels.calibrate import calibrate

    from .tiny_models import tiny_model, token_batches

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        data = token_batches(4, seed=5)
        halves = calibrate(tiny_model("llama"), data[rank::world_size], progress=False)
        # A rank without any batch still takes part (it learns the sharing groups from the others).
        one_rank = calibrate(tiny_model("llama"), data if rank == 0 else [], progress=False)
        # A failure on one rank (NaN activations on rank 1) is raised on every rank instead of hanging the others.
        broken = tiny_model("llama")
        with torch.no_grad():
            broken.model.embed_tokens.weight[5] = float("nan")
        batch = {"input_ids": torch.full((1, 4), 5 if rank == 1 else 6)}
        try:
            calibrate(broken, [batch], progress=False)
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        torch.save({"halves": halves, "one_rank": one_rank, "error": error}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
