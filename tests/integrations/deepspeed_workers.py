"""Workers of tests/integrations/test_deepspeed.py (their own module so torch.multiprocessing's spawn can import
them): DeepSpeed ZeRO-3 on 2 gloo CPU processes through the HF Trainer.

Each rank checks that ``lk.inject`` refuses a model built under ``deepspeed.zero.Init`` with the way out, then takes
that way out: the tiny Llama built without ZeRO-3, adapters injected, and the Trainer's DeepSpeed engine partitions
the adapted model and trains it. The same training in one process (the Trainer without DeepSpeed, the whole batch)
is the reference."""
import os

import torch

from tests.helpers import gloo_worker

STEPS, LR = 3, 5e-3
CONFIG = dict(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_seed=0)
# persistence threshold 0: the tiny weights are partitioned too (by default ZeRO-3 keeps weights under 1e5
# elements whole on every rank)
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


def adapted_llama():
    import loranull_kernels as lk
    from tests.tiny_models import tiny_model

    return lk.inject(tiny_model("llama"), lk.AdapterConfig(**CONFIG)).train()


def dataset():
    """4 equal-length sequences: with 2 per rank on 2 ranks, or 4 in one process, every step sees all of them
    whatever the samplers' order, and the mean of the ranks' token means is the global one."""
    from tests.tiny_models import token_batches

    ids = token_batches(1, batch=4, seq=10, seed=3)[0]["input_ids"]
    return [{"input_ids": row, "labels": row} for row in ids]


def train(model, out_dir: str, world_size: int, deepspeed=None, callback=False):
    """STEPS optimizer steps of the HF Trainer on :func:`dataset`, a global batch of 4, with
    ``lk.integrations.transformers.AdapterCallback`` when ``callback``; returns the losses."""
    from transformers import Trainer, TrainingArguments

    from loranull_kernels.integrations.transformers import AdapterCallback

    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=4 // world_size, max_steps=STEPS,
                             learning_rate=LR, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, deepspeed=deepspeed, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                      callbacks=[AdapterCallback()] if callback else None)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def adapter_state(model, gather=None) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole (gathered from the ZeRO-3 partitions when ``gather`` is given)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if gather is None:
        return {n: p.detach().clone() for n, p in params.items()}
    with gather(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))

    def body(rank):
        import deepspeed

        import loranull_kernels as lk
        from loranull_kernels import nn as lknn
        from tests.tiny_models import tiny_model

        # deepspeed.comm must wrap the process group before zero.Init, else it sees a world of size 1
        deepspeed.init_distributed("gloo")
        result = {}
        whole = tiny_model("llama")  # built (and cached by tiny_model) outside the context
        init_config = {"zero_optimization": ZERO3["zero_optimization"], "train_batch_size": 4,
                       "train_micro_batch_size_per_gpu": 2}
        with deepspeed.zero.Init(config_dict_or_path=init_config):
            partitioned = type(whole)(whole.config)
        try:
            lk.inject(partitioned, lk.AdapterConfig(**CONFIG))
        except ValueError as e:
            result["refusal"] = str(e)
        calls = []
        real = lknn.lora_linear
        lknn.lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
        with lk.backend.use("torch"):
            model = adapted_llama()
            result["losses"] = train(model, f"{out_dir}/run{rank}", world_size, deepspeed=dict(ZERO3))
        lknn.lora_linear = real
        q = model.model.layers[0].self_attn.q_proj
        result["partitioned"] = {"weight": tuple(q.weight.shape), "ds": hasattr(q.weight, "ds_id"),
                                 "lora_A": hasattr(q.lora_A, "ds_id")}
        result["fused_calls"] = len(calls)
        result["state"] = adapter_state(model, deepspeed.zero.GatheredParameters)
        # KaSA's penalty needs whole matrices at each step: AdapterCallback refuses it once ZeRO-3 partitioned them
        kasa = lk.inject(tiny_model("llama"), lk.AdapterConfig(**{**CONFIG, "method": "kasa"}))
        try:
            train(kasa, f"{out_dir}/kasa{rank}", world_size, deepspeed=dict(ZERO3), callback=True)
        except RuntimeError as e:
            result["kasa_refusal"] = str(e)
        return result

    gloo_worker(rank, world_size, port, out_dir, body)
