"""Worker of the two-process calibration test (a module of its own so torch.multiprocessing.spawn can import it)."""
import datetime
import os

import torch
import torch.distributed as dist


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
        # Block by block inside inject: every rank builds the adapters of the global statistics.
        model = inject(tiny_model("llama"), AdapterConfig(method="lora_null", r=4), calibration_data=data[rank::world_size],
                       progress=False, calibration_mode="sequential")
        out["adapter"] = {n: m.lora_A.detach().clone() for n, m in model.named_modules() if hasattr(m, "lora_A")}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
