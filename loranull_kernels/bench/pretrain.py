"""Pre-train a small Llama on the synthetic world (:mod:`loranull_kernels.bench.world`), once per machine.

:func:`load_or_pretrain` returns a ``transformers.LlamaForCausalLM`` that knows the world's facts: trained from a
seed on every statement and training-phrasing question, then checked on the held-out phrasings. The weights and
a JSON record (configuration, recall, training time, versions) are cached under ``$LORANULL_CACHE`` (default
``~/.cache/loranull_kernels``), keyed by a hash of the configuration and of the generated corpus, so the forgetting
benchmark trains it once and later runs load it in a second.

Why a full language-model loss on facts stated several ways: a model trained only on one question phrasing
memorises that sentence; one trained on statements *and* questions stores the fact and answers phrasings it never
saw (the held-out recall measures exactly this).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import qa
from .world import EOS, World, WorldConfig

_FORMAT = 1  # bump when the training recipe changes, so stale caches are not reused


@dataclass(frozen=True)
class PretrainConfig:
    """The model and its pre-training. Defaults: the full benchmark (0.73 M parameters, 2.7 min on 2 CPU cores).

    ``min_recall``: :func:`load_or_pretrain` refuses a model whose held-out-phrasing recall is below it.
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    min_recall: float = 0.9

    def key(self) -> str:
        """A short hash of everything that determines the trained weights: the fields (not ``min_recall``) and the
        generated world itself, so a change to the corpus generator never reuses a stale model."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "min_recall"}
        blob = json.dumps({"format": _FORMAT, "world": World(self.world).fingerprint(), **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_model(config: PretrainConfig, world: World):
    """A randomly initialised ``LlamaForCausalLM`` over the world's vocabulary (tied embeddings), seeded by
    ``config.seed`` without touching the global generator."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(world.vocab), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=32, tie_word_embeddings=True,
        pad_token_id=world.vocab.pad_id, eos_token_id=world.vocab.eos_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return transformers.LlamaForCausalLM(cfg)


def recall(model, world: World, phrasing: str = "held_out") -> float:
    """Fraction of the world's facts answered exactly, averaged over the phrasings of ``phrasing``."""
    questions = [q for f in world.facts for q in world.questions(f, phrasing)]
    return qa.exact_match(model, world.vocab, questions).float().mean().item()


def pretrain(config: PretrainConfig, progress: bool = True):
    """Train from scratch; returns ``(model, world, record)`` with ``record`` holding recalls, loss and seconds."""
    world = World(config.world)
    model = build_model(config, world)
    sentences = [(f"{s} {EOS}", "") for s in world.corpus()]
    batch = qa.encode(world.vocab, sentences, with_answer=False)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, qa.IGNORE)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)
    # One-cycle: short warm-up, cosine decay to ~0, which lets the last steps settle on the facts.
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(config.steps), desc="pre-training on the synthetic world", unit="step", disable=not progress):
        idx = torch.randint(0, len(sentences), (config.batch_size,), generator=g)
        loss = model(**qa.rows(batch, idx)).loss
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    record = dict(recall_held_out=recall(model, world, "held_out"), recall_train=recall(model, world, "train"),
                  final_loss=loss.item(), seconds=time.perf_counter() - start,
                  parameters=sum(p.numel() for p in model.parameters()), facts=len(world.facts),
                  vocab=len(world.vocab), torch=torch.__version__)
    return model, world, record


def cache_dir() -> Path:
    """``$LORANULL_CACHE`` or ``~/.cache/loranull_kernels``."""
    return Path(os.environ.get("LORANULL_CACHE", Path.home() / ".cache" / "loranull_kernels"))


def load_or_pretrain(config: PretrainConfig = PretrainConfig(), progress: bool = True, directory=None):
    """The pre-trained model for ``config``: loaded from the cache, or trained (and cached) on a miss.

    Returns ``(model, world, record)``: the model in eval mode on the CPU, its :class:`World`, and the record
    written at training time plus ``"cached"`` (whether it was loaded). Raises ``RuntimeError`` if the held-out
    recall is below ``config.min_recall`` (such a model has no knowledge worth measuring the forgetting of).
    """
    from safetensors.torch import load_file, save_file

    directory = Path(directory) if directory is not None else cache_dir()
    weights, meta = directory / f"world_llama_{config.key()}.safetensors", directory / f"world_llama_{config.key()}.json"
    if weights.exists() and meta.exists():
        world = World(config.world)
        model = build_model(config, world)
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied lm_head is not stored twice
            raise RuntimeError(f"cache entry {weights} does not match the model: missing {missing}, unexpected "
                               f"{unexpected}; delete it to retrain")
        record = {**json.loads(meta.read_text())["record"], "cached": True}
        model.eval()
    else:
        model, world, record = pretrain(config, progress=progress)
        directory.mkdir(parents=True, exist_ok=True)
        # Write to temporary names and rename, so an interrupted run never leaves a half-written cache entry.
        tmp_w, tmp_m = weights.with_suffix(".tmp.safetensors"), meta.with_suffix(".tmp.json")
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(tmp_w))
        tmp_m.write_text(json.dumps({"config": dataclasses.asdict(config), "record": record}, indent=2))
        os.replace(tmp_w, weights)
        os.replace(tmp_m, meta)
        record = {**record, "cached": False}
    if record["recall_held_out"] < config.min_recall:
        raise RuntimeError(f"the pre-trained model recalls {record['recall_held_out']:.1%} of the facts in held-out "
                           f"phrasings, below min_recall = {config.min_recall:.0%}: train longer (steps) or on fewer "
                           "facts")
    return model, world, record
