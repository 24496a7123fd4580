"""Worker for the pre-training robustness test: one (seed, flush-denormal) pre-training of the quick model in a
spawned single-thread process (the flag is per thread, and two one-thread processes use both cores)."""
import dataclasses


def pretrain_quick(seed: int, flush: bool, cache: str) -> dict:
    import torch

    from loranull_kernels._denormals import _flushing
    from loranull_kernels.bench import forgetting
    from loranull_kernels.bench.pretrain import load_or_pretrain, pretrain

    torch.set_num_threads(1)
    config = dataclasses.replace(forgetting.QUICK.pretrain, seed=seed)
    if flush:  # the package's default path, cached for the tests that use the quick model afterwards
        _, _, record = load_or_pretrain(config, progress=False, directory=cache)
    else:
        _, _, record = pretrain(config, progress=False, flush_denormal=False)
    return {"seed": seed, "flush": flush, "recall": record["recall_held_out"], "steps": record["steps_trained"],
            "best_step": record["best_step"], "cached": record.get("cached", False), "flag_after": _flushing()}
