"""The calibration text of the real-model forgetting benchmark: what LoRA-Null (and the data-driven PEFT peers, and
LaLoRA's curvature) are shown of the knowledge to keep, and how much of it.

Three kinds (:data:`KINDS`), each cut to as many sentences as a share of the calibration half of the facts:

- ``"facts"``: the calibration half of the probe facts as plain sentences (the default: the knowledge itself, minus
  the held-out half that is scored);
- ``"docs"``: generic technical English that has nothing to do with the facts, the docstrings of this package's own
  source files (read with :mod:`ast`, nothing imported; they ship with the package, so the text is there offline);
- ``"generated"``: text the model writes itself, sampled from one-word openings (``"The"``, ``"In"``, ...), which
  needs no data from the user at all; cached by model hash, so every process and rerun calibrates on the same text.

A user who asks "which text should I calibrate on?" reads the answer off the benchmark's calibration table
(docs/benchmarks.md).
"""
from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import torch

from .harness import cache_dir

KINDS = ("facts", "docs", "generated")
OPENINGS = ("The", "In", "A", "One", "It", "There", "This", "When", "Many", "Most", "Some", "Each")


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (the facts half is grouped by relation: every part keeps every
    relation)."""
    return [math.floor(i * n / k) for i in range(k)]


def texts(kind: str, model, tokenizer, facts: list, fraction: float = 1.0, key: str | None = None) -> list[str]:
    """The calibration sentences: ``round(fraction · len(facts))`` of them (at least 1) of ``kind``.

    Args:
        kind: one of :data:`KINDS`. facts: the calibration half (:class:`.llm_probe.Fact`). key: the model hash,
            which keys the cache of the generated text.
    Raises:
        ValueError: an unknown kind or a fraction outside (0, 1].
    """
    if kind not in KINDS:
        raise ValueError(f"calibration kind {kind!r}: choose one of {KINDS}")
    if not 0 < fraction <= 1:
        raise ValueError(f"calibration fraction must be in (0, 1], got {fraction}")
    n = max(1, round(fraction * len(facts)))
    if kind == "facts":
        return [facts[i].sentence for i in _spread(len(facts), n)]
    if kind == "docs":
        pool = doc_sentences()
        return [pool[i] for i in _spread(len(pool), min(n, len(pool)))]
    return generated(model, tokenizer, n, key)


def _plain(text: str) -> str:
    """A docstring without reStructuredText markup: ``:func:`x``` and ````x```` become ``x``."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"`+([^`]+)`+", r"\1", text)


def doc_sentences(package_dir: Path | None = None) -> list[str]:
    """The sentences (8 to 40 words, in file order) of every docstring in this package's source files."""
    root = package_dir or Path(__file__).resolve().parents[1]
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc:
                continue
            flat = " ".join(_plain(doc).split())
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
                if 8 <= len(sentence.split()) <= 40:
                    out.append(sentence)
    return out


@torch.no_grad()
def generated(model, tokenizer, n: int, key: str | None = None, max_new_tokens: int = 32, seed: int = 0) -> list[str]:
    """``n`` texts the model samples (temperature 1, top-p 0.95, ``seed``) from the one-word :data:`OPENINGS`, in
    turn. With ``key`` (the model hash) they are cached as JSON under ``$LORANULL_CACHE/calibration``."""
    path = Path(cache_dir()) / "calibration" / f"{key}_{n}_{max_new_tokens}_{seed}.json" if key else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())["texts"]
    device = next(model.parameters()).device
    per_opening = math.ceil(n / len(OPENINGS))
    out: list[list[str]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        was_training = model.training
        model.eval()
        for opening in OPENINGS:
            ids = torch.tensor([tokenizer(opening)["input_ids"]], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=0.95,
                                 top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=per_opening,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append([" ".join(tokenizer.decode(g, skip_special_tokens=True).split()) for g in gen])
        model.train(was_training)
    # Round-robin over the openings, so a short list still starts in every way.
    texts_ = [out[j][i] for i in range(per_opening) for j in range(len(OPENINGS))][:n]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"texts": texts_}))
    return texts_
