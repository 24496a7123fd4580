"""The forgetting benchmark: learn a new task, keep the old knowledge. Every method, equal budgets, several seeds.

A small Llama pre-trained on a synthetic world (:mod:`.pretrain`, :mod:`.world`) knows hundreds of facts; it is
fine-tuned on multi-digit addition (:mod:`.arithmetic`), which it cannot do, with each method of the package and
with full fine-tuning. After fine-tuning we measure

- **target accuracy**: exact-match accuracy on held-out addition problems (learning);
- **retention**: the share of the facts it still recalls, in phrasings never seen in pre-training, relative to the
  pre-trained model (forgetting);
- the **leak** of each adapter (LoRA-Null's measure): the share of held-out knowledge activations' energy inside
  the row space of A, averaged over the adapted layers, at init and after fine-tuning; and the same share of the
  new task's activations at init (what the adapter can see of the task it must learn).

Protocol (the same for every method): rank ``r`` on every linear layer of the blocks, ``steps`` AdamW steps of
``batch_size`` problems, a one-cycle learning-rate schedule; the learning rate is picked per method from
``lrs`` by validation target accuracy on the first seed (ties: the better retention), then every seed runs at
that rate and the reported numbers are test accuracy and retention, mean ± standard deviation over the seeds.
LaLoRA is LoRA plus a penalty, so its λ sweep runs at LoRA's selected rate and traces a curve from LoRA's point
(λ = 0) towards no learning; so does its control, an isotropic pull to the start ("l2-to-init"), which shows what
LaLoRA's learnt curvature adds. LoRA-Null calibrates on fact *questions* in the training phrasings (the paper
calibrates on NQ-open questions); LaLoRA estimates its curvature on pre-training sentences.

Everything goes through the public API (``lk.inject``, ``lk.calibrate`` via ``inject``, ``lk.estimate_curvature``,
``lk.regularization_loss``, ``lk.after_optimizer_step``, ``lk.nullspace.leak``), so the benchmark doubles as the
package's end-to-end test. Reporting (CSV, plot, the table of docs/benchmarks.md): :mod:`.forgetting_report`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import AdapterConfig, after_optimizer_step, backend, estimate_curvature, inject, nullspace
from .. import regularization_loss
from ..targets import find_targets
from .._denormals import flush_denormals
from . import arithmetic, qa
from .peft_peers import PEERS, PeftPeer, Refused, adapter_rows, fused_summary
from .peft_peers import attach as attach_peer
from .pretrain import PretrainConfig, load_or_pretrain, recall
from .world import EOS, World, WorldConfig

# The blocks' linear layers, as the papers adapt them (the embeddings and the tied head stay frozen).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class BenchmarkEntry:
    """One row of the benchmark: a method (or one setting of its hyperparameter) under test, with its learning-rate
    grid. ``config`` None and no ``peer`` means full fine-tuning (every parameter trains)."""

    name: str
    family: str
    config: AdapterConfig | None
    lrs: tuple[float, ...]
    peer: PeftPeer | None = None  # a PEFT initialisation (family "peft"), built by PEFT itself: .peft_peers

    @property
    def lalora_lambda(self) -> float | None:
        """λ of the Laplace penalty, for the methods that carry one."""
        if self.config is None or self.config.effective_regularizer != "lalora":
            return None
        return self.config.lalora_lambda


@dataclass(frozen=True)
class BenchmarkConfig:
    """Budgets and grids. :data:`QUICK` (CI, a couple of minutes) and :data:`FULL` (the committed results)."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    r: int = 8
    steps: int = 400
    batch_size: int = 32
    digits: tuple[int, int] = (2, 1)
    seeds: tuple[int, ...] = (0, 1, 2)
    adapter_lrs: tuple[float, ...] = (2e-3, 4e-3, 8e-3)
    full_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    lalora_lambdas: tuple[float, ...] = (3e3, 1e4, 3e4)
    lalora_prior_precision: float = 1e-6
    l2_controls: tuple[float, ...] = (1e-2,)
    rose_keep: float = 0.3
    calibration_questions: int = 512
    curvature_batches: int = 8
    leak_questions: int = 400
    methods: tuple[str, ...] | None = None  # a subset of method names; None: all
    peers: tuple[str, ...] = tuple(PEERS)  # PEFT's initialisations run as rows (.peft_peers.PEERS)

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.steps < 1 or self.batch_size < 1 or self.r < 1:
            raise ValueError("steps, batch_size and r must be ≥ 1")
        check_peers(self.peers)


def with_run_choices(cfg, methods=None, seeds=None, lrs=None, peers=None):
    """``cfg`` (either forgetting benchmark's configuration: both carry these fields) with the command line's
    ``--methods``, ``--seeds``, ``--lrs`` and ``--peers`` applied where given (duplicates dropped). Raises ValueError
    for an unknown peer."""
    if methods is not None:
        cfg = dataclasses.replace(cfg, methods=tuple(methods))
    if seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=tuple(dict.fromkeys(seeds)))
    if lrs is not None:
        cfg = dataclasses.replace(cfg, adapter_lrs=tuple(dict.fromkeys(lrs)))
    if peers is not None:
        cfg = dataclasses.replace(cfg, peers=tuple(dict.fromkeys(peers)))
    return cfg


def check_peers(peers: tuple[str, ...]) -> None:
    """ValueError for a peer name :data:`.peft_peers.PEERS` does not declare."""
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown PEFT peers {unknown}; choose from {list(PEERS)}")


# The full model's held-out recall moved with the machine: 93.8% (step 2,000) when the committed results were
# measured, 86.3% (best checkpoint of 2,000 steps) on this project's machine with transformers 5.24. The bar is a
# sanity check (a model that knows most facts), so it sits at 80%, below both with a margin; retention is reported
# relative to the model's own recall.
FULL = BenchmarkConfig(pretrain=PretrainConfig(min_recall=0.8))
# The quick model's world has 80 countries: with 40, held-out recall depended on the seed and the machine's rounding
# (56.7% for seed 0 on the project's CPUs, 93% for seeds 1 and 2); with 80 it passed 90% by step 600-800 for seeds
# 0, 1 and 2 (more facts force the model to learn the question forms instead of the sentences).
QUICK = BenchmarkConfig(
    pretrain=PretrainConfig(world=WorldConfig(n_entities=80, relations=("capital", "language", "population")),
                            hidden_size=96, intermediate_size=192, num_layers=2, steps=1200, batch_size=32, lr=3e-3,
                            stop_recall=0.95),
    r=4, steps=60, batch_size=16, seeds=(0, 1), adapter_lrs=(3e-3, 1e-2), full_lrs=(1e-3,), lalora_lambdas=(1e4,),
    calibration_questions=64, curvature_batches=2, leak_questions=64, peers=("peft:corda-kpm",))


_AT_LORA_RATE = ("lalora", "l2")  # LoRA plus a penalty: run at LoRA's selected learning rate, no sweep of their own


def methods(cfg: BenchmarkConfig) -> list[BenchmarkEntry]:
    """The benchmark's rows. Scalings follow the papers: s = 2 (alpha = 2r) for LoRA and the methods built on its
    init (KaSA, RoseLoRA, LaLoRA), s = 1 (alpha = r) for the SVD-based inits (PiSSA, MiLoRA, LoRA-Null)."""
    r, lrs = cfg.r, cfg.adapter_lrs
    base = dict(r=r, target_modules=TARGETS)
    plain = AdapterConfig(method="lora", alpha=2 * r, **base)
    # RoseLoRA for fine-tuning (not editing): keep a fraction rose_keep of each row of A / column of B, pruning on the
    # cubic schedule from 10% to 60% of the steps, no clamp.
    rose = AdapterConfig(method="roselora", alpha=2 * r, rose_keep=cfg.rose_keep, rose_t_init=max(1, cfg.steps // 10),
                         rose_t_final=max(2, (6 * cfg.steps) // 10), **base)
    out = [
        BenchmarkEntry("full fine-tuning", "full", None, cfg.full_lrs),
        BenchmarkEntry("lora", "lora", plain, lrs),
        BenchmarkEntry("pissa", "pissa", AdapterConfig(method="pissa", alpha=r, **base), lrs),
        BenchmarkEntry("milora", "milora", AdapterConfig(method="milora", alpha=r, **base), lrs),
        BenchmarkEntry("lora_null v1", "lora_null", AdapterConfig(method="lora_null", alpha=r, **base), lrs),
        BenchmarkEntry("lora_null v2", "lora_null", AdapterConfig(method="lora_null", alpha=r, freeze_A=True, **base),
                       lrs),
        BenchmarkEntry("kasa", "kasa", AdapterConfig(method="kasa", alpha=2 * r, **base), lrs),
        BenchmarkEntry("roselora", "roselora", rose, lrs),
    ]
    # PEFT's own initialisations (.peft_peers), on the same grid: the rivals a user would otherwise pick.
    out += [BenchmarkEntry(name, "peft", None, lrs, peer=PEERS[name]) for name in cfg.peers]
    # LaLoRA = LoRA + the Laplace penalty: its λ sweep runs at LoRA's selected rate (filled in by run()).
    out += [BenchmarkEntry(f"lalora λ={lam:g}", "lalora",
                           dataclasses.replace(plain, method="lalora", lalora_lambda=lam,
                                               lalora_prior_precision=cfg.lalora_prior_precision), ())
            for lam in cfg.lalora_lambdas]
    # The control for LaLoRA: the same penalty with the curvature made irrelevant (λ = 1 and a prior precision μ
    # that dwarfs the Fisher, whose largest entry is 8e-6 on the full benchmark), i.e. a plain isotropic pull
    # (μ/2)‖θ − θ0‖² towards the start.
    # μ = λ·δ of a LaLoRA point isolates what its learnt curvature adds.
    out += [BenchmarkEntry(f"l2-to-init μ={mu:g}", "l2",
                           dataclasses.replace(plain, method="lalora", lalora_lambda=1.0,
                                               lalora_prior_precision=mu), ())
            for mu in cfg.l2_controls]
    if cfg.methods is not None:
        families = {m.family for m in out}
        unknown = set(cfg.methods) - {m.name for m in out} - families
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {[m.name for m in out]} or a family "
                             f"{sorted(families)}")
        out = [m for m in out if m.name in cfg.methods or m.family in cfg.methods]
    return out


@dataclass
class Setup:
    """Everything the runs share: the pre-trained model, its world, the task, and the data of calibration,
    curvature and evaluation (built once)."""

    config: BenchmarkConfig
    base: torch.nn.Module
    world: World
    record: dict
    task: dict[str, list[tuple[str, str]]]
    train_batch: dict
    calibration: list[dict]
    source: list[dict]
    held_out: list[tuple[str, str]]
    leak_batch: dict
    task_leak_batch: dict
    recall_before: float
    device: torch.device


def prepare(cfg: BenchmarkConfig, device=None, progress: bool = True) -> Setup:
    """Load (or pre-train once) the model and build the shared data."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base, world, record = load_or_pretrain(cfg.pretrain, progress=progress)
    base = base.to(device)
    g = torch.Generator().manual_seed(1234)

    def pick(items: list, n: int) -> list:
        idx = torch.randperm(len(items), generator=g)[: min(n, len(items))]
        return [items[i] for i in idx.tolist()]

    train_questions = [q for f in world.facts for q in world.questions(f, "train")]
    held_out = [q for f in world.facts for q in world.questions(f, "held_out")]
    calib = pick(train_questions, cfg.calibration_questions)
    calibration = [qa.encode(world.vocab, calib[i : i + 64], with_answer=False) for i in range(0, len(calib), 64)]
    sentences = pick([(f"{s} {EOS}", "") for s in world.corpus()], 32 * cfg.curvature_batches)
    source = []
    for i in range(0, len(sentences), 32):
        b = qa.encode(world.vocab, sentences[i : i + 32], with_answer=False)
        source.append({**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, qa.IGNORE)})
    leak_batch = qa.encode(world.vocab, pick(held_out, cfg.leak_questions), with_answer=False)
    task = arithmetic.splits(cfg.digits, seed=cfg.pretrain.seed)
    task_leak_batch = qa.encode(world.vocab, task["test"][: cfg.leak_questions], with_answer=False)
    return Setup(cfg, base, world, record, task, qa.encode(world.vocab, task["train"]), calibration, source, held_out,
                 leak_batch, task_leak_batch,
                 recall(base, world, "held_out"), device)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def mean_leak(model: torch.nn.Module, batch: dict) -> float:
    """Mean over the adapter layers of ``lk.nullspace.leak`` of their inputs on ``batch`` (padding excluded)."""
    rows = adapter_rows(model)
    if not rows:
        return math.nan
    layers = [m for m, _ in rows]
    keep = batch["attention_mask"].reshape(-1).bool()
    inputs: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0].detach()))
             for m in layers]
    try:
        model.eval()
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    leaks = [nullspace.leak(inputs[m].reshape(-1, inputs[m].shape[-1])[keep.to(inputs[m].device)], A)
             for m, A in rows]
    return sum(leaks) / len(leaks)


def train(model: torch.nn.Module, data: dict, lr: float, steps: int, batch_size: int, seed: int, device,
          loss_fn=None) -> tuple[list[torch.Tensor], list[float]]:
    """The benchmark's fine-tuning loop: ``steps`` AdamW steps (one-cycle schedule to ``lr``) on random rows of the
    encoded batch ``data`` (drawn from ``seed``), task loss ``loss_fn(model, batch)`` (default ``model(**batch).loss``)
    plus ``lk.regularization_loss``, ``lk.after_optimizer_step`` after each step; stops at a non-finite loss. Leaves
    the model in eval mode. Returns (the trained parameters, the task loss of every step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(10_000 + seed)
    model.train()
    losses = []
    with flush_denormals():  # Adam states of tiny gradients: 18× slower steps on some CPUs without this
        for step in range(steps):
            idx = torch.randint(0, data["input_ids"].shape[0], (batch_size,), generator=g)
            batch = _to(qa.rows(data, idx), device)
            task_loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
            loss = task_loss + regularization_loss(model)
            loss.backward()
            opt.step()
            schedule.step()
            after_optimizer_step(model, step)
            opt.zero_grad(set_to_none=True)
            losses.append(task_loss.item())
            if not math.isfinite(losses[-1]):
                break
    model.eval()
    return params, losses


def attach(model: torch.nn.Module, method: BenchmarkEntry, seed: int, calibration: list[dict], source: list[dict],
           r: int, targets=None) -> torch.nn.Module:
    """Make ``model`` (modified in place) ready to fine-tune with ``method``: every parameter trainable (full
    fine-tuning), our adapter injected (``lk.inject``, calibrated on ``calibration`` when the method needs it, LaLoRA's
    curvature estimated on ``source``), or a PEFT peer built by PEFT (:func:`.peft_peers.attach`, calibrated on the
    same batches, at rank ``r``). ``targets`` replaces the method's target modules. Returns the model to train.

    Raises:
        Refused: PEFT refused the peer (its reason).
    """
    if method.peer is not None:
        names = [n for n, _ in find_targets(model, targets or TARGETS)]
        return attach_peer(model, method.peer, r, names, calibration, seed)
    if method.config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    config = dataclasses.replace(method.config, init_seed=seed)
    if targets is not None:
        config = dataclasses.replace(config, target_modules=targets)
    inject(model, config, calibration_data=calibration if config.needs_calibration else None, progress=False)
    if config.effective_regularizer == "lalora":
        estimate_curvature(model, source)
    return model


def refused_row(method: BenchmarkEntry, lr: float, seed: int, cfg, reason: str, recall_before: float) -> dict:
    """The result row of a run PEFT refused to build: the metrics NaN, ``refused`` its reason."""
    nan = math.nan
    return dict(method=method.name, family=method.family, lr=lr, seed=seed, lalora_lambda=None, r=cfg.r,
                steps=cfg.steps, batch_size=cfg.batch_size, val_accuracy=nan, target_accuracy=nan,
                recall_before=recall_before, recall_init=nan,
                recall_after=nan, retention=nan, leak_init=nan, leak_final=nan, task_leak_init=nan,
                final_task_loss=nan, trainable=0, seconds=0.0, refused=reason, peft_fused="")


def fine_tune(setup: Setup, method: BenchmarkEntry, lr: float, seed: int) -> dict:
    """One run: copy the pre-trained model, attach the method, train on the task, measure. Returns a result row."""
    cfg, world, device = setup.config, setup.world, setup.device
    start = time.perf_counter()
    try:
        model = attach(copy.deepcopy(setup.base), method, seed, [_to(b, device) for b in setup.calibration],
                       [_to(b, device) for b in setup.source], cfg.r)
    except Refused as e:
        return refused_row(method, lr, seed, cfg, str(e), setup.recall_before)
    leak_batch = _to(setup.leak_batch, device)
    leak_init = mean_leak(model, leak_batch)
    task_leak_init = mean_leak(model, _to(setup.task_leak_batch, device))  # how much of the new task A can see
    recall_init = recall(model, world, "held_out")  # KaSA's truncation changes the model before any step
    params, losses = train(model, setup.train_batch, lr, cfg.steps, cfg.batch_size, seed, device)
    recall_after = recall(model, world, "held_out")
    tail = losses[-max(1, len(losses) // 10):]
    return dict(
        method=method.name, family=method.family, lr=lr, seed=seed, lalora_lambda=method.lalora_lambda,
        r=cfg.r, steps=cfg.steps, batch_size=cfg.batch_size,
        val_accuracy=qa.exact_match(model, world.vocab, setup.task["val"]).float().mean().item(),
        target_accuracy=qa.exact_match(model, world.vocab, setup.task["test"]).float().mean().item(),
        recall_before=setup.recall_before, recall_init=recall_init, recall_after=recall_after,
        retention=recall_after / setup.recall_before,
        recall_train_phrasing=recall(model, world, "train"),
        leak_init=leak_init, leak_final=mean_leak(model, leak_batch), task_leak_init=task_leak_init,
        final_task_loss=sum(tail) / len(tail), trainable=sum(p.numel() for p in params),
        seconds=time.perf_counter() - start, refused="", peft_fused=fused_summary(model))


def _select(rows: list[dict]) -> dict:
    """The selection seed's best row: highest validation accuracy, then highest retention."""
    def score(v: float) -> float:  # a refused run's NaN ranks last
        return -math.inf if math.isnan(v) else v

    return max(rows, key=lambda r: (score(r["val_accuracy"]), score(r["retention"])))


# Runs are independent, and on a CPU a small model trains faster as several one-thread processes than as one
# multi-threaded process (2 cores: 1.6× the throughput, measured), so run() spreads them over worker processes.
_WORKER: dict = {}


def _init_worker(cfg: BenchmarkConfig, device: str, backend_name: str, threads: int) -> None:
    os.environ["LORANULL_BACKEND"] = backend_name  # the parent's choice, including a backend.use() override
    torch.set_num_threads(threads)
    _WORKER["setup"] = prepare(cfg, device, progress=False)  # loads the model the parent cached
    _WORKER["methods"] = {m.name: m for m in methods(cfg)}


def _work(job: tuple[str, float, int]) -> dict:
    name, lr, seed = job
    return fine_tune(_WORKER["setup"], _WORKER["methods"][name], lr, seed)


def default_workers(device: torch.device) -> int:
    """One process on a GPU; on a CPU one single-threaded process per available core."""
    if device.type != "cpu":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(cfg: BenchmarkConfig = FULL, device=None, progress: bool = True, workers: int | None = None) -> dict:
    """Run the whole protocol. Returns ``{"runs": [...every run...], "setup": Setup, "seconds": ..., "workers"}``;
    each run row carries ``selected`` (whether it is at its method's selected learning rate).

    ``workers``: processes running fine-tuning runs at once (default :func:`default_workers`); 1 runs them in this
    process, under this process's backend and thread settings."""
    start = time.perf_counter()
    setup = prepare(cfg, device, progress)  # pre-trains and caches the model on first use, before any worker starts
    workers = default_workers(setup.device) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    todo = methods(cfg)
    by_name = {m.name: m for m in todo}
    bar = tqdm(total=protocol_size(todo, cfg.seeds),
               desc=f"forgetting benchmark ({workers} worker{'s' * (workers > 1)})", unit="run", disable=not progress)
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                   initargs=(cfg, str(setup.device), backend.requested(), 1))

    def batch(jobs: list[tuple[str, float, int]]) -> list[dict]:
        if pool is None:
            out = []
            for job in jobs:
                bar.set_postfix_str(f"{job[0]} lr={job[1]:g} seed={job[2]}")
                out.append(fine_tune(setup, by_name[job[0]], job[1], job[2]))
                bar.update()
            return out
        futures = [pool.submit(_work, job) for job in jobs]
        for _ in as_completed(futures):
            bar.update()
        return [f.result() for f in futures]

    try:
        rows = protocol(todo, cfg.seeds, cfg.adapter_lrs[len(cfg.adapter_lrs) // 2], batch)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return {"runs": rows, "setup": setup, "seconds": time.perf_counter() - start, "workers": workers}


def protocol_size(todo: list, seeds: tuple[int, ...]) -> int:
    """How many runs :func:`protocol` makes for these methods and seeds."""
    swept = [m for m in todo if m.family not in _AT_LORA_RATE]
    return sum(len(m.lrs) + len(seeds) - 1 for m in swept) + (len(todo) - len(swept)) * len(seeds)


def protocol(todo: list, seeds: tuple[int, ...], default_lr: float, batch) -> list[dict]:
    """The benchmark's two phases, for any model: ``batch(jobs)`` runs ``(method name, lr, seed)`` jobs and returns
    their result rows (with ``method``, ``lr``, ``val_accuracy``, ``retention``) in job order.

    Phase 1 runs every swept method at each of its ``lrs`` on the first seed and selects one rate (:func:`_select`);
    phase 2 runs the other seeds at that rate, and LoRA's penalised variants (LaLoRA, its l2 control) on every seed at
    LoRA's selected rate (``default_lr`` when LoRA is not among ``todo``). Returns every row, each with
    ``selected``: whether it is at its method's selected rate."""
    first, rest = seeds[0], seeds[1:]
    swept = [m for m in todo if m.family not in _AT_LORA_RATE]
    at_lora_rate = [m for m in todo if m.family in _AT_LORA_RATE]
    sweep = batch([(m.name, lr, first) for m in swept for lr in m.lrs])  # phase 1: learning rates, first seed
    rows = list(sweep)
    chosen: dict[str, float] = {}
    for m in swept:
        best = _select([r for r in sweep if r["method"] == m.name])
        chosen[m.name] = best["lr"]
        for r in sweep:
            if r["method"] == m.name:
                r["selected"] = r is best
    lora_lr = chosen.get("lora", default_lr)
    jobs = [(m.name, chosen[m.name], seed) for m in swept for seed in rest]  # phase 2: the other seeds
    jobs += [(m.name, lora_lr, seed) for m in at_lora_rate for seed in seeds]
    for r in batch(jobs):
        r["selected"] = True
        rows.append(r)
    return rows
