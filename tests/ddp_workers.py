"""DDP training worker for tests/test_ddp.py (its own module so torch.multiprocessing's spawn can import it)."""
import os

import torch

STEPS, LR = 3, 0.5


def adapted_llama():
    """The tiny Llama with LoRA injected and a nonzero, seeded B (so A trains from step one)."""
    import loranull_kernels as lk
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    lk.inject(model, lk.AdapterConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def batch():
    """The full batch: 2 sequences of equal length (so the mean of per-rank token means is the global mean)."""
    from tests.tiny_models import token_batches
    return token_batches(1, batch=2, seq=10, seed=3)[0]["input_ids"]


def train(model, ids):
    """STEPS SGD steps on ``ids``; returns the trainable parameters afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return params


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import loranull_kernels as lk

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with lk.backend.use("torch"):
            model = DDP(adapted_llama())
            ids = batch()[rank::world_size]
            params = train(model, ids)
        torch.save([p.detach() for p in params], f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without running destructors: freeing DDP's Reducer drops the last reference to the gloo process group,
    # whose destructor joins its worker thread while holding the GIL, and that thread may need the GIL to release
    # a finished work item: a deadlock seen on this CPU machine (py-spy: ~ProcessGroupGloo -> thread::join vs
    # gil_scoped_acquire in runLoop). The results are on disk; exit code 0 tells torch.multiprocessing it succeeded.
    os._exit(0)
