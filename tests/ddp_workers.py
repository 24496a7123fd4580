"""DDP training worker for tests/test_ddp.py (its own module so torch.multiprocessing's spawn can import it)."""
import torch

from tests.helpers import gloo_worker

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
    from torch.nn.parallel import DistributedDataParallel as DDP

    import loranull_kernels as lk

    def body(rank):
        with lk.backend.use("torch"):
            model = DDP(adapted_llama())
            params = train(model, batch()[rank::world_size])
        return [p.detach() for p in params]

    gloo_worker(rank, world_size, port, out_dir, body)
