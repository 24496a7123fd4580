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

from .._denormals import flush_denormals
from . import qa
from .harness import cache_dir
from .world import EOS, World, WorldConfig

_FORMAT = 2  # bump when the training recipe changes, so stale caches are not reused (2: checkpoint selection)


@dataclass(frozen=True)
class PretrainConfig:
    """The model and its pre-training. Defaults: the full benchmark (0.73 M parameters, ≈ 3 min on 2 CPU cores).

    ``steps`` is the budget (the one-cycle schedule's length). Every ``eval_every`` steps the held-out recall is
    measured; training stops as soon as it reaches ``stop_recall`` (None: never early), and the best checkpoint
    seen is the model. ``min_recall``: a model whose held-out-phrasing recall is below it is refused (and never
    cached). Why checkpoints: held-out recall is a generalisation across phrasings that can peak and then decay
    while the training phrasings are still being memorised (quick model, seed 0: 82% at step 500, 57% at 1,200),
    and two CPUs do not round alike, so a recipe must clear ``min_recall`` with a margin, not by luck.
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
    eval_every: int = 100
    stop_recall: float | None = None
    min_recall: float = 0.9

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "steps", "batch_size",
                     "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PretrainConfig.{name} must be an int ≥ 1, got {value!r}")
        if self.steps < 3:
            raise ValueError(f"PretrainConfig.steps must be ≥ 3 (a warm-up and a decay), got {self.steps}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"PretrainConfig.lr must be a number > 0, got {self.lr!r}")
        if self.stop_recall is not None and not (isinstance(self.stop_recall, (int, float))
                                                 and 0.0 <= self.stop_recall <= 1.0):
            raise ValueError(f"PretrainConfig.stop_recall must be None or in [0, 1], got {self.stop_recall!r}")
        if not (isinstance(self.min_recall, (int, float)) and self.min_recall >= 0.0):
            raise ValueError(f"PretrainConfig.min_recall must be a number ≥ 0, got {self.min_recall!r}")

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


def pretrain(config: PretrainConfig, progress: bool = True, flush_denormal: bool = True):
    """Train from scratch; returns ``(model, world, record)``.

    ``record``: held-out and training-phrasing recall of the returned checkpoint, ``best_step`` (its step),
    ``steps_trained``, ``curve`` (``[step, held-out recall]`` at every check), final loss, seconds, sizes, torch
    version. ``flush_denormal``: flush denormal floats during training (18× faster steps on some CPUs); the
    global flag is restored afterwards.
    """
    world = World(config.world)
    model = build_model(config, world)
    sentences = [(f"{s} {EOS}", "") for s in world.corpus()]
    batch = qa.encode(world.vocab, sentences, with_answer=False)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, qa.IGNORE)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)
    # One-cycle: short warm-up, cosine decay to ~0, which lets the last steps settle on the facts.
    # (at least two warm-up steps: OneCycleLR divides by the warm-up length minus one)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=max(0.05, 2 / config.steps))
    g = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    curve: list[list] = []
    best: tuple[float, int, dict] | None = None
    bar = tqdm(range(1, config.steps + 1), desc="pre-training on the synthetic world", unit="step",
               disable=not progress)
    with flush_denormals(flush_denormal):
        for step in bar:
            model.train()
            idx = torch.randint(0, len(sentences), (config.batch_size,), generator=g)
            loss = model(**qa.rows(batch, idx)).loss
            loss.backward()
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            if step % config.eval_every and step != config.steps:
                continue
            held_out = recall(model, world, "held_out")
            curve.append([step, round(held_out, 4)])
            bar.set_postfix_str(f"held-out recall {held_out:.1%}")
            if best is None or held_out > best[0]:
                best = (held_out, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if config.stop_recall is not None and held_out >= config.stop_recall:
                break
    bar.close()
    model.load_state_dict(best[2])
    model.eval()
    record = dict(recall_held_out=best[0], recall_train=recall(model, world, "train"), best_step=best[1],
                  steps_trained=step, curve=curve, final_loss=loss.item(), seconds=time.perf_counter() - start,
                  parameters=sum(p.numel() for p in model.parameters()), facts=len(world.facts),
                  vocab=len(world.vocab), torch=torch.__version__)
    return model, world, record


def load_or_pretrain(config: PretrainConfig = PretrainConfig(), progress: bool = True, directory=None):
    """The pre-trained model for ``config``: loaded from the cache, or trained (and cached) on a miss.

    Returns ``(model, world, record)``: the model in eval mode on the CPU, its :class:`World`, and the record
    written at training time plus ``"cached"`` (whether it was loaded). Raises ``RuntimeError`` if the held-out
    recall is below ``config.min_recall`` (such a model has no knowledge worth measuring the forgetting of); such
    a model is not cached, so a rerun with a larger budget (``steps``) trains again.
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
        _check_recall(record, config)
        directory.mkdir(parents=True, exist_ok=True)
        # Write to temporary names and rename, so an interrupted run never leaves a half-written cache entry.
        tmp_w, tmp_m = weights.with_suffix(".tmp.safetensors"), meta.with_suffix(".tmp.json")
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(tmp_w))
        tmp_m.write_text(json.dumps({"config": dataclasses.asdict(config), "record": record}, indent=2))
        os.replace(tmp_w, weights)
        os.replace(tmp_m, meta)
        record = {**record, "cached": False}
    _check_recall(record, config)
    return model, world, record


def _check_recall(record: dict, config: PretrainConfig) -> None:
    if record["recall_held_out"] < config.min_recall:
        raise RuntimeError(
            f"the pre-trained model recalls {record['recall_held_out']:.1%} of the facts in held-out phrasings "
            f"(best of {record.get('steps_trained', config.steps)} steps), below min_recall = "
            f"{config.min_recall:.0%}: give pre-training a larger budget (loranull-forgetting --pretrain-steps N, "
            "PretrainConfig.steps) or fewer facts")
