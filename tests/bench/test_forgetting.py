"""The forgetting benchmark end to end (quick mode), and its parts: the world, the task, the pre-training cache.

These check the pipeline's invariants, not the ranking of the methods (that is what the committed full-mode results
are for).
"""
import csv
import dataclasses
import math
import os

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.bench import arithmetic, forgetting, forgetting_report, qa
from loranull_kernels.bench.pretrain import PretrainConfig, load_or_pretrain, recall
from loranull_kernels.bench.world import World, WorldConfig


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh model cache for this module (spawned workers inherit the variable)."""
    path = tmp_path_factory.mktemp("lk_cache")
    old = os.environ.get("LORANULL_CACHE")
    os.environ["LORANULL_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["LORANULL_CACHE"]
    else:
        os.environ["LORANULL_CACHE"] = old


def test_world_is_deterministic_and_held_out_phrasings_never_occur_in_pretraining():
    a, b = World(WorldConfig(n_entities=30, seed=3)), World(WorldConfig(n_entities=30, seed=3))
    assert a.facts == b.facts and a.vocab.words == b.vocab.words and a.fingerprint() == b.fingerprint()
    assert World(WorldConfig(n_entities=30, seed=4)).fingerprint() != a.fingerprint()
    assert len(a.facts) == 30 * len(a.config.relations)
    corpus = a.corpus()
    for fact in a.facts:
        for prompt, answer in a.questions(fact, "held_out"):
            assert answer == fact.answer
            assert not any(s.startswith(prompt) for s in corpus), prompt  # the phrasing is new to the model
            a.vocab.encode(prompt)  # every word is in the vocabulary
        for prompt, answer in a.questions(fact, "train"):
            assert f"{prompt} {answer}" in corpus
    # Countries, capitals and leaders are unique names: one answer per (country, relation).
    capitals = [f.answer for f in a.facts if f.relation == "capital"]
    assert len(set(capitals)) == len(capitals)
    populations = [f.answer for f in a.facts if f.relation == "population"]
    assert all(10 <= int(p.replace(" ", "")) <= 99 for p in populations)
    with pytest.raises(ValueError, match="relations"):
        WorldConfig(relations=("capital", "moons"))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        a.vocab.encode("the capital of Atlantis")


def test_addition_splits_are_disjoint_and_correct():
    parts = arithmetic.splits((2, 1), n_val=50, n_test=70, seed=1)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [1000 - 120, 50, 70]
    prompts = [set(p for p, _ in parts[k]) for k in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    for prompt, answer in parts["test"]:
        words = prompt.split()
        a, b = words[words.index("is") + 1 : words.index("plus")], words[words.index("plus") + 1 : words.index("?")]
        assert int("".join(a)) + int("".join(b)) == int(answer.replace(" ", ""))
    with pytest.raises(ValueError):
        arithmetic.splits((1, 1), n_val=50, n_test=50)


def test_exact_match_scores_the_whole_answer_and_eos():
    world = World(WorldConfig(n_entities=4))
    vocab = world.vocab
    examples = [("Q : what is 4 plus 5 ? A :", "9"), ("Q : what is 1 2 plus 3 ? A :", "1 5")]

    class Oracle(torch.nn.Module):
        """Predicts the labelled continuation, except the token set in ``wrong``."""

        def __init__(self, wrong=None):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.wrong = wrong

        def forward(self, input_ids, attention_mask):
            labels = qa.encode(vocab, examples)["labels"]
            logits = torch.zeros(*input_ids.shape, len(vocab))
            nxt = labels[:, 1:].clamp_min(0)
            logits[:, :-1].scatter_(-1, nxt[..., None], 1.0)
            if self.wrong is not None:
                row, col = self.wrong
                logits[row, col] = 0
                logits[row, col, vocab.index["7"]] = 1.0
            return type("Out", (), {"logits": logits})()

    assert qa.exact_match(Oracle(), vocab, examples).tolist() == [True, True]
    last = int(qa.encode(vocab, examples)["attention_mask"][1].sum()) - 2  # the position predicting <eos>
    assert qa.exact_match(Oracle(wrong=(1, last)), vocab, examples).tolist() == [True, False]


def test_pretraining_is_cached_and_reloaded_bit_identically(tmp_path):
    cfg = PretrainConfig(world=WorldConfig(n_entities=6, relations=("capital", "population")), hidden_size=32,
                         intermediate_size=64, num_layers=1, steps=30, batch_size=8, min_recall=0.0)
    model, world, record = load_or_pretrain(cfg, progress=False, directory=tmp_path)
    assert not record["cached"] and len(list(tmp_path.glob("*.safetensors"))) == 1
    again, world2, record2 = load_or_pretrain(cfg, progress=False, directory=tmp_path)
    assert record2["cached"] and record2["recall_held_out"] == record["recall_held_out"]
    ids = qa.encode(world.vocab, world.questions(world.facts[0]), with_answer=False)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert recall(again, world2) == record["recall_held_out"]
    # Deterministic from the seed: training again elsewhere gives the same weights.
    fresh, _, _ = load_or_pretrain(cfg, progress=False, directory=tmp_path / "elsewhere")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    with pytest.raises(RuntimeError, match="min_recall"):
        load_or_pretrain(dataclasses.replace(cfg, min_recall=1.01), progress=False, directory=tmp_path)


def test_quick_pretraining_reaches_its_recall_target_on_three_seeds_with_and_without_flushing_denormals(cache):
    """The quick model must clear min_recall with a margin on any seed and floating-point mode, not by luck of one
    machine's rounding (a 40-country world gave 57% on one seed); the default seed's flushed run fills the cache
    that the pipeline tests below load."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tests.bench.pretrain_workers import pretrain_quick

    cfg = forgetting.QUICK.pretrain
    jobs = [(seed, flush) for flush in (True, False) for seed in (cfg.seed, cfg.seed + 1, cfg.seed + 2)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(pretrain_quick, *zip(*jobs), [str(cache)] * len(jobs)))
    for r in results:
        assert r["recall"] >= cfg.min_recall, results
        assert r["steps"] <= cfg.steps and r["best_step"] <= r["steps"]
        assert r["flag_after"] is False, r  # the global flag is restored after training
    # Held-out recall is a property of the recipe, not of denormals: both modes clear the bar on every seed.
    assert {(r["seed"], r["flush"]) for r in results} == set(jobs)


def test_a_model_under_min_recall_is_never_cached(tmp_path):
    cfg = PretrainConfig(world=WorldConfig(n_entities=6, relations=("capital", "population")), hidden_size=32,
                         intermediate_size=64, num_layers=1, steps=20, batch_size=8, eval_every=10, min_recall=1.01)
    for _ in range(2):  # a rerun trains again instead of loading the refused model
        with pytest.raises(RuntimeError, match="pretrain-steps"):
            load_or_pretrain(cfg, progress=False, directory=tmp_path)
        assert not list(tmp_path.iterdir())


def test_pretraining_keeps_its_best_checkpoint_and_stops_at_the_target(tmp_path):
    cfg = PretrainConfig(world=WorldConfig(n_entities=6, relations=("capital", "population")), hidden_size=32,
                         intermediate_size=64, num_layers=1, steps=40, batch_size=8, eval_every=10, min_recall=0.0)
    model, world, record = forgetting_pretrain(cfg)
    steps = [s for s, _ in record["curve"]]
    assert steps == [10, 20, 30, 40] and record["steps_trained"] == 40
    best = max(record["curve"], key=lambda c: c[1])
    assert record["best_step"] == best[0] and record["recall_held_out"] == pytest.approx(best[1], abs=1e-4)
    assert recall(model, world) == pytest.approx(record["recall_held_out"])  # the returned weights are that checkpoint
    _, _, early = forgetting_pretrain(dataclasses.replace(cfg, stop_recall=0.0))
    assert early["steps_trained"] == 10 and early["curve"] == [[10, early["curve"][0][1]]]
    with pytest.raises(ValueError, match="eval_every"):
        PretrainConfig(eval_every=0)
    with pytest.raises(ValueError, match="stop_recall"):
        PretrainConfig(stop_recall=1.5)


def forgetting_pretrain(cfg):
    from loranull_kernels.bench.pretrain import pretrain

    return pretrain(cfg, progress=False)


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_benchmark_pipeline_invariants(cache, tmp_path):
    with lk.backend.use("torch"):
        out = forgetting_report.main(["--quick", "--out-dir", str(tmp_path), "--workers", "1", "--no-progress"])
    result, cfg = out["result"], forgetting.QUICK
    setup, runs = result["setup"], result["runs"]
    assert setup.record["recall_held_out"] >= cfg.pretrain.min_recall
    assert abs(setup.recall_before - setup.record["recall_held_out"]) < 1e-6

    names = [m.name for m in forgetting.methods(cfg)]
    assert list(dict.fromkeys(r["method"] for r in runs)) == names
    n_questions = len(setup.held_out)
    for m in forgetting.methods(cfg):
        mine = [r for r in runs if r["method"] == m.name]
        selected = [r for r in mine if r["selected"]]
        assert sorted(r["seed"] for r in selected) == sorted(cfg.seeds)
        assert len({r["lr"] for r in selected}) == 1  # every seed at the one selected rate
        if m.family in ("lalora", "l2"):
            assert selected[0]["lr"] == next(r["lr"] for r in runs if r["method"] == "lora" and r["selected"])
        else:
            assert sorted(r["lr"] for r in mine if r["seed"] == cfg.seeds[0]) == sorted(m.lrs)
            assert selected[0]["lr"] in m.lrs
        for r in mine:
            for key in ("val_accuracy", "target_accuracy", "recall_after", "recall_init"):
                assert 0.0 <= r[key] <= 1.0, (key, r)
            assert math.isclose(r["retention"], r["recall_after"] / r["recall_before"])
            assert math.isfinite(r["final_task_loss"])
            if m.family != "kasa":  # every other method leaves the pre-trained outputs unchanged at init
                assert abs(r["recall_init"] - r["recall_before"]) <= 2 / n_questions, r
            if m.family == "peft":  # built by PEFT, every layer trained through the patch's fused op
                assert r["peft_fused"] == "14 of 14 layers fused" and not r["refused"], r  # 2 blocks × 7
            if m.config is None and m.peer is None:
                assert math.isnan(r["leak_init"]) and r["trainable"] == sum(p.numel() for p in setup.base.parameters())
            else:
                assert 0.0 <= r["leak_init"] <= 1.0 and 0.0 <= r["task_leak_init"] <= 1.0

    def first(name):
        return next(r for r in runs if r["method"] == name)

    # LoRA-Null's A avoids the calibration (knowledge) activations: its leak on held-out questions is far below a
    # random A's; v2 trains B only.
    assert first("lora_null v1")["leak_init"] < 0.25 * first("lora")["leak_init"]
    assert first("peft:corda-kpm")["leak_init"] < 0.25 * first("lora")["leak_init"]  # PEFT's KPM: the same aim
    assert first("lora_null v2")["trainable"] < first("lora_null v1")["trainable"]
    # The pre-trained model cannot do the task.
    assert qa.exact_match(setup.base, setup.world.vocab, setup.task["test"]).float().mean() < 0.05

    summary = _read(out["paths"]["summary"])
    assert [r["method"] for r in summary] == names
    assert all(r["device"] and r["commit"] for r in summary)
    assert len(_read(out["paths"]["runs"])) == len(runs)
    assert out["paths"]["plot"].stat().st_size > 10_000
    table = forgetting_report.markdown_table(forgetting_report.summarize(runs))
    assert table.count("\n") == len(names) + 1


def test_worker_processes_give_the_same_protocol(cache, tmp_path):
    """The parallel path (spawned workers, the parent's backend choice passed on) runs the same jobs."""
    cfg = dataclasses.replace(forgetting.QUICK, methods=("lora", "lalora"))
    with lk.backend.use("torch"):
        result = forgetting.run(cfg, progress=False, workers=2)
    runs = result["runs"]
    assert result["workers"] == 2
    assert [(r["method"], r["seed"]) for r in runs] == (
        [("lora", cfg.seeds[0])] * len(cfg.adapter_lrs) + [("lora", s) for s in cfg.seeds[1:]]
        + [(f"lalora λ={lam:g}", s) for lam in cfg.lalora_lambdas for s in cfg.seeds])
    assert all(0.0 <= r["target_accuracy"] <= 1.0 and math.isfinite(r["final_task_loss"]) for r in runs)
