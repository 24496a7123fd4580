"""Workers of tests/integrations/test_distributed_training.py (their own module so torch.multiprocessing's spawn can
import them): KaSA + RoseLoRA adapters trained under DDP and under FSDP2 (fully_shard) on 2 gloo CPU processes,
with the penalty added by the penalty hooks and the masks by after_optimizer_step."""

import torch

from tests.helpers import gloo_worker

STEPS, LR = 3, 0.5
CONFIG = dict(method="kasa", sparsity="roselora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
              init_seed=0, kasa_gamma=0.5, kasa_beta=0.05, rose_t_init=0, rose_t_final=2, rose_keep=0.5)


def adapted_llama():
    import loranull_kernels as lk
    from tests.tiny_models import tiny_model

    return lk.inject(tiny_model("llama"), lk.AdapterConfig(**CONFIG)).train()


def batch():
    """The full batch: 4 sequences of equal length (so the mean of per-rank token means is the global mean)."""
    from tests.tiny_models import token_batches
    return token_batches(1, batch=4, seq=10, seed=3)[0]["input_ids"]


def train(model, ids, module=None):
    """STEPS SGD steps on ``ids`` (the penalty comes from the hooks, the masks from after_optimizer_step)."""
    import loranull_kernels as lk

    module = module if module is not None else model
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        lk.after_optimizer_step(module, step)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters (whole, also when sharded) and RoseLoRA masks, by name."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone()
    for n, b in model.named_buffers():
        if n.endswith(("mask_A", "mask_B")):
            out[n] = b.detach().clone()
    return out


def worker(rank: int, world_size: int, port: int, out_dir: str):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import loranull_kernels as lk

    def body(rank):
        ids = batch()[rank::world_size]
        with lk.backend.use("torch"):
            model = adapted_llama()
            train(DDP(model), ids, module=model)
            result = {"ddp": adapter_state(model)}

            model = adapted_llama()
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            q = model.model.layers[0].self_attn.q_proj
            result["sharded"] = {name: (type(t).__name__, tuple(t.to_local().shape), tuple(t.shape))
                                 for name, t in (("weight", q.weight), ("lora_A", q.lora_A))}
            train(model, ids)
            result["fsdp2"] = adapter_state(model)
            result["penalty"] = lk.regularize.penalty_values(model)
        return result

    gloo_worker(rank, world_size, port, out_dir, body)
