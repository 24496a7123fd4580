"""A synthetic world to pre-train on: invented countries and their facts, in a word-level language.

The forgetting benchmark (:mod:`loranull_kernels.bench.forgetting`) needs a pre-trained model with *known*
knowledge and no download. This module generates it, deterministically from a seed:

- ``n_entities`` invented countries ("Veloria"), each with one value per relation: a capital and a leader (unique
  invented names), a language and a currency (drawn from small invented pools), a population (a two-digit number of
  millions, one token per digit); a region relation is available too;
- pre-training sentences: for every fact, statements ("the capital of Veloria is Ostrun .") and questions in the
  *training* phrasings ("Q : what is the capital of Veloria ? A : Ostrun");
- recall questions in **held-out phrasings** that never appear in pre-training ("Q : which capital does Veloria
  have ? A :"): a model that answers them has stored the fact, not a sentence;
- the new task's words (``plus``; the digits are already known from the populations), so the fine-tuning task
  (:mod:`loranull_kernels.bench.arithmetic`) shares the vocabulary and the ``Q : ... A :`` format, and competes with
  the facts for the same answer slot.

Every word is one token (a closed vocabulary): a name is one token, a population two (its digits). Numbers are
part of the world on purpose: with tied embeddings, tokens a model never sees in pre-training are all pushed along
the same direction (their logits only ever get pushed down) until they are nearly indistinguishable, and a task
written in such tokens cannot be learnt by adapters, which leave the embeddings frozen.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# Each relation: the pool its values come from ("unique": a fresh invented name per country; an int: that many
# invented names shared by the countries; "number": a two-digit number written digit by digit) and its statement
# templates. "{e}" is the country, "{a}" the answer.
RELATIONS: dict[str, dict] = {
    "capital": dict(pool="unique", statements=[
        "the capital of {e} is {a} .", "{e} has its capital in {a} .", "in {e} the capital is {a} ."]),
    "language": dict(pool=24, statements=[
        "the language of {e} is {a} .", "people in {e} speak {a} .", "in {e} the language is {a} ."]),
    "currency": dict(pool=20, statements=[
        "the currency of {e} is the {a} .", "{e} pays with the {a} .", "in {e} the currency is the {a} ."]),
    "leader": dict(pool="unique", statements=[
        "the leader of {e} is {a} .", "{e} is led by {a} .", "in {e} the leader is {a} ."]),
    "population": dict(pool="number", statements=[
        "the population of {e} is {a} million .", "{e} has {a} million people .", "in {e} the population is {a} million ."]),
    "region": dict(pool=8, statements=[
        "{e} lies in the region {a} .", "the region of {e} is {a} .", "in {e} the region is {a} ."]),
}

# Question phrasings, "{k}" the relation's name. Pre-training asks in the first set (in both word orders, so that
# the model learns to find a fact from either side); recall is tested in the second, which never occurs in
# pre-training: new words ("which", "does", "name", ",") and new combinations, the keyword kept as a real paraphrase
# keeps it.
TRAIN_QUESTIONS = ["Q : what is the {k} of {e} ? A : {a}", "Q : tell me the {k} of {e} . A : {a}",
                   "Q : for {e} , what is the {k} ? A : {a}"]
HELD_OUT_QUESTIONS = ["Q : which {k} does {e} have ? A : {a}", "Q : name the {k} of {e} . A : {a}",
                      "Q : {e} , {k} ? A : {a}"]

PAD, EOS = "<pad>", "<eos>"
TASK_WORDS = [str(d) for d in range(10)] + ["plus"]  # the fine-tuning task's words (arithmetic.py)

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "th", "kr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ia", "ae", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "th", "m"]


@dataclass(frozen=True)
class WorldConfig:
    """What to generate. ``n_entities`` countries × ``relations`` facts; ``seed`` fixes every name and value."""

    n_entities: int = 160
    relations: tuple[str, ...] = ("capital", "language", "currency", "leader", "population")
    seed: int = 0

    def __post_init__(self):
        if self.n_entities < 2:
            raise ValueError(f"n_entities must be ≥ 2, got {self.n_entities}")
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown or not self.relations:
            raise ValueError(f"relations must be a non-empty subset of {sorted(RELATIONS)}, got {self.relations}")


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    answer: str


class Vocab:
    """A closed word-level vocabulary: ``encode("the capital of Veloria is")`` → token ids, one per word."""

    def __init__(self, words: list[str]):
        self.words = list(dict.fromkeys([PAD, EOS] + words))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.eos_id = self.index[PAD], self.index[EOS]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids)


def _invented_names(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        word = word.capitalize()
        if word not in taken:
            taken.add(word)
            names.append(word)
    return names


class World:
    """The generated countries, their facts, and the sentences about them (see the module docstring)."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config
        rng = random.Random(config.seed)
        taken: set[str] = set()
        self.entities = _invented_names(config.n_entities, rng, taken)
        self.facts: list[Fact] = []
        values: list[str] = []
        for relation in config.relations:
            pool = RELATIONS[relation]["pool"]
            if pool == "unique":
                answers = _invented_names(config.n_entities, rng, taken)
            elif pool == "number":
                answers = [" ".join(str(rng.randrange(10, 100))) for _ in self.entities]
            else:
                choices = _invented_names(pool, rng, taken)
                answers = [rng.choice(choices) for _ in self.entities]
            values += [w for a in answers for w in a.split()]
            self.facts += [Fact(e, relation, a) for e, a in zip(self.entities, answers)]
        templates = [t for rel in config.relations for t in RELATIONS[rel]["statements"]]
        templates += [t.replace("{k}", rel) for rel in config.relations for t in TRAIN_QUESTIONS + HELD_OUT_QUESTIONS]
        template_words = {w for t in templates for w in t.split() if w not in ("{e}", "{a}")}
        self.vocab = Vocab(sorted(template_words) + self.entities + sorted(set(values)) + TASK_WORDS)

    def statements(self, fact: Fact) -> list[str]:
        """The pre-training sentences about ``fact``: its statements and its training-phrasing questions."""
        templates = RELATIONS[fact.relation]["statements"] + TRAIN_QUESTIONS
        return [t.format(e=fact.entity, a=fact.answer, k=fact.relation) for t in templates]

    def questions(self, fact: Fact, phrasing: str = "held_out") -> list[tuple[str, str]]:
        """``(prompt, answer)`` pairs asking for ``fact``; ``phrasing``: ``"held_out"`` (never pre-trained on) or
        ``"train"`` (the pre-training questions, e.g. for calibration)."""
        if phrasing not in ("held_out", "train"):
            raise ValueError(f"phrasing must be 'held_out' or 'train', got {phrasing!r}")
        templates = HELD_OUT_QUESTIONS if phrasing == "held_out" else TRAIN_QUESTIONS
        out = []
        for t in templates:
            prompt, _, _ = t.format(e=fact.entity, a="{a}", k=fact.relation).rpartition(" {a}")
            out.append((prompt, fact.answer))
        return out

    def fingerprint(self) -> str:
        """A hash of the vocabulary, the corpus and the held-out questions."""
        held_out = [" ".join(q) for f in self.facts for q in self.questions(f)]
        blob = "\n".join(self.vocab.words + self.corpus() + held_out)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def corpus(self) -> list[str]:
        """Every pre-training sentence, in a fixed order."""
        return [s for f in self.facts for s in self.statements(f)]
