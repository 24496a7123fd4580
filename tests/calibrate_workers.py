"""Worker of the two-process calibration test (a module of its own so torch.multiprocessing.spawn can import it)."""
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


class OddBatchesTransformed(nn.Module):
    """A block stack run as a plain chain except on batches of 3 rows, whose hidden states are halved between the
    blocks: only the rank that gets such batches sees that block-by-block calibration cannot reproduce it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x) * (0.5 if x.shape[0] == 3 else 1.0)
        return x


def odd_batches(rank: int) -> list:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(2 + rank, 6, generator=g) for _ in range(2)]


def calibrate_worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ["LORANULL_BACKEND"] = "torch"
    from loranull_kernels.calibrate import calibrate
    from loranull_kernels.config import AdapterConfig
    from loranull_kernels.inject import inject

    from .tiny_models import tiny_model, token_batches

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        data = token_batches(4, seed=5)
        out = {}
        for mode in ("one_pass", "sequential"):
            tag = "" if mode == "one_pass" else "_sequential"
            out["halves" + tag] = calibrate(tiny_model("llama"), data[rank::world_size], progress=False,
                                            calibration_mode=mode)
            # A rank without any batch still takes part (it learns the sharing groups from the others).
            out["one_rank" + tag] = calibrate(tiny_model("llama"), data if rank == 0 else [], progress=False,
                                              calibration_mode=mode)
            # A failure on one rank (NaN activations on rank 1) is raised on every rank instead of hanging the others.
            broken = tiny_model("llama")
            with torch.no_grad():
                broken.model.embed_tokens.weight[5] = float("nan")
            batch = {"input_ids": torch.full((1, 4), 5 if rank == 1 else 6)}
            try:
                calibrate(broken, [batch], progress=False, calibration_mode=mode)
                out["error" + tag] = None
            except Exception as exc:
                out["error" + tag] = f"{type(exc).__name__}: {exc}"
        # A model only rank 1 sees is not a chain: every rank falls back to one pass together ("auto").
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["not_a_chain"] = calibrate(OddBatchesTransformed(), odd_batches(rank), progress=False,
                                           calibration_mode="auto")
        out["not_a_chain_warned"] = any("calibrating in one pass" in str(w.message) for w in caught)
        # Block by block inside inject: every rank builds the adapters of the global statistics.
        model = inject(tiny_model("llama"), AdapterConfig(method="lora_null", r=4), calibration_data=data[rank::world_size],
                       progress=False, calibration_mode="sequential")
        out["adapter"] = {n: m.lora_A.detach().clone() for n, m in model.named_modules() if hasattr(m, "lora_A")}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
