"""The knowledge probe of the real-model forgetting benchmark: short factual completions the base model gets right.

``data/facts.tsv`` (shipped with the package) lists ``relation, subject, answer`` rows over seven relations
(capitals, official languages, currencies, chemical symbols, authors, continents, painters); :data:`TEMPLATES`
turn a row into a completion prompt (``"The capital of France is"`` → ``" Paris"``). :func:`known_facts` keeps the
facts a model answers right (teacher-forced exact match of the answer tokens, :func:`.llm_text.exact_match`),
cached by model hash; :func:`split` divides them, per relation, into a calibration half (LoRA-Null's calibration
text and LaLoRA's curvature data, as plain sentences: :func:`sentences`) and a held-out half whose recall after
fine-tuning is the retention.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import llm_text
from .harness import cache_dir

FACTS_FILE = Path(__file__).with_name("data") / "facts.tsv"

TEMPLATES = {
    "capital": "The capital of {} is",
    "language": "The official language of {} is",
    "currency": "The currency of {} is the",
    "symbol": "The chemical symbol for {} is",
    "author": "{} was written by",
    "continent": "{} is a country in",
    "painter": "{} was painted by",
}


@dataclass(frozen=True)
class Fact:
    """One probe item: ``prompt`` + ``answer`` (leading space included) is a true sentence."""

    relation: str
    subject: str
    answer: str

    @property
    def prompt(self) -> str:
        """The completion prompt, e.g. ``"The capital of France is"``."""
        return TEMPLATES[self.relation].format(self.subject)

    @property
    def example(self) -> tuple[str, str]:
        """``(prompt, " answer")`` for :mod:`.llm_text`."""
        return self.prompt, " " + self.answer

    @property
    def sentence(self) -> str:
        """The fact as a plain sentence, e.g. ``"The capital of France is Paris."``."""
        return f"{self.prompt} {self.answer}."


def load_facts(path=FACTS_FILE) -> list[Fact]:
    """Every row of the facts file, in file order.

    Raises:
        ValueError: a relation without a template, or a duplicated (relation, subject).
    """
    with open(path, newline="", encoding="utf-8") as f:
        facts = [Fact(r["relation"], r["subject"], r["answer"]) for r in csv.DictReader(f, delimiter="\t")]
    unknown = {f.relation for f in facts} - set(TEMPLATES)
    if unknown:
        raise ValueError(f"{path}: relations without a template: {sorted(unknown)}")
    keys = [(f.relation, f.subject) for f in facts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: duplicated (relation, subject) rows")
    return facts


def known_facts(model, tokenizer, facts: list[Fact], key: str | None = None, directory=None) -> list[Fact]:
    """The facts ``model`` answers right, in input order. With ``key`` (the model hash), the answer is cached as
    JSON under ``directory`` (default ``$LORANULL_CACHE/probe``), keyed by the model and the facts themselves."""
    path = None
    if key is not None:
        import hashlib

        digest = hashlib.sha256("\n".join(f"{f.relation}\t{f.prompt}\t{f.answer}" for f in facts).encode())
        path = Path(directory or cache_dir() / "probe") / f"{key}_{digest.hexdigest()[:12]}.json"
        if path.is_file():
            known = json.loads(path.read_text())["known"]
            return [f for f, k in zip(facts, known) if k]
    hits = llm_text.exact_match(model, tokenizer, [f.example for f in facts]).tolist()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"known": hits, "facts": len(facts)}))
    return [f for f, k in zip(facts, hits) if k]


def split(facts: list[Fact], seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """``(calibration, held_out)``: each relation's facts shuffled with ``seed`` and halved (the odd one out goes to
    the held-out half), so both halves cover every relation and no fact is in both."""
    g = torch.Generator().manual_seed(seed)
    calibration, held_out = [], []
    for relation in dict.fromkeys(f.relation for f in facts):
        mine = [f for f in facts if f.relation == relation]
        order = torch.randperm(len(mine), generator=g).tolist()
        half = len(mine) // 2
        calibration += [mine[i] for i in order[:half]]
        held_out += [mine[i] for i in order[half:]]
    return calibration, held_out
