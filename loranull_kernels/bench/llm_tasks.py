"""The new tasks of the real-model forgetting benchmark: a made-up compositional code no pre-trained model knows
(:func:`code_task`), a made-up word operation (:func:`swap_task`), two-digit addition (:func:`add_task`) and a date
reformatting (:func:`date_task`); :data:`TASKS` names them.

A code is a made-up syllable and a two-digit number, ``"Code vak-37 means"``; its meaning is two words, the
syllable's colour and the number's animal: ``" red fox"``. The 100 (syllable, number) pairs are split into train,
validation and test codes, so the test asks for combinations never seen in training: the model has to learn the
20 part meanings and compose them, not memorise 100 strings. The surface form (codes, a colour and an animal) shares
nothing with the factual sentences of :mod:`.llm_probe`, and the mapping is drawn at random, so a base model scores
≈ 0 (the benchmark measures it).
"""
from __future__ import annotations

import torch

SYLLABLES = ("vak", "mol", "tez", "rup", "dax", "siv", "lom", "kef", "zun", "pim")
NUMBERS = ("12", "27", "35", "41", "58", "63", "74", "86", "93", "19")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "purple", "orange", "gray")
ANIMALS = ("fox", "horse", "eagle", "shark", "tiger", "rabbit", "whale", "snake", "mouse", "wolf")


def code_task(seed: int = 0, n_val: int = 20, n_test: int = 20) -> dict[str, list[tuple[str, str]]]:
    """``{"train", "val", "test"}`` lists of ``(prompt, answer)``: disjoint sets of codes, every syllable and every
    number present in the training codes. The part meanings are a random matching drawn from ``seed``.

    Raises:
        ValueError: ``n_val + n_test`` leaves fewer training codes than syllables + numbers.
    """
    pairs = len(SYLLABLES) * len(NUMBERS)
    if n_val < 1 or n_test < 1 or pairs - n_val - n_test < len(SYLLABLES) + len(NUMBERS):
        raise ValueError(f"n_val={n_val}, n_test={n_test}: need ≥ 1 each and ≥ {len(SYLLABLES) + len(NUMBERS)} of "
                         f"the {pairs} codes left for training")
    g = torch.Generator().manual_seed(seed)
    colour = dict(zip(SYLLABLES, (COLOURS[i] for i in torch.randperm(len(COLOURS), generator=g).tolist())))
    animal = dict(zip(NUMBERS, (ANIMALS[i] for i in torch.randperm(len(ANIMALS), generator=g).tolist())))
    codes = [(s, n) for s in SYLLABLES for n in NUMBERS]
    while True:  # redraw until every part occurs in training (almost always the first draw)
        order = [codes[i] for i in torch.randperm(pairs, generator=g).tolist()]
        train = order[n_val + n_test :]
        if {s for s, _ in train} == set(SYLLABLES) and {n for _, n in train} == set(NUMBERS):
            break

    def examples(part):
        return [(f"Code {s}-{n} means", f" {colour[s]} {animal[n]}") for s, n in part]

    return {"train": examples(train), "val": examples(order[:n_val]), "test": examples(order[n_val : n_val + n_test])}


WORDS = ("apple", "river", "stone", "bread", "chair", "window", "garden", "candle", "mirror", "pencil", "bottle",
         "button", "carpet", "castle", "cloud", "desert", "engine", "feather", "forest", "hammer", "island", "jacket",
         "kettle", "ladder", "lemon", "market", "meadow", "needle", "orange", "pillow", "planet", "pocket", "rabbit",
         "saddle", "shadow", "silver", "spider", "summer", "ticket", "tunnel", "valley", "violin", "wallet", "winter",
         "museum", "basket", "blanket", "bridge", "butter", "camera", "cotton", "doctor", "dragon", "farmer", "finger",
         "flower", "guitar", "helmet", "hunter", "jungle")


def swap_task(seed: int = 0, n_val: int = 20, n_test: int = 20, n_train: int = 300) -> dict[str, list[tuple[str, str]]]:
    """``{"train", "val", "test"}`` lists of ``(prompt, answer)`` for a made-up operator that swaps two words:
    ``"zorp apple river ="`` → ``" river apple"``. The word pairs of the three splits are disjoint (drawn from
    ``seed``), so the test asks for the rule on pairs never seen in training.

    Raises:
        ValueError: a split size < 1.
    """
    if min(n_val, n_test, n_train) < 1:
        raise ValueError(f"n_train={n_train}, n_val={n_val}, n_test={n_test}: need ≥ 1 each")
    g = torch.Generator().manual_seed(seed)
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    order = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[: n_val + n_test + n_train].tolist()]

    def examples(part):
        return [(f"zorp {a} {b} =", f" {b} {a}") for a, b in part]

    return {"train": examples(order[n_val + n_test :]), "val": examples(order[:n_val]),
            "test": examples(order[n_val : n_val + n_test])}


def _splits(items: list, n_val: int, n_test: int, n_train: int, seed: int, example) -> dict[str, list]:
    """Shuffle ``items`` with ``seed`` and cut disjoint validation, test and training parts, as examples."""
    if min(n_val, n_test, n_train) < 1 or n_val + n_test + n_train > len(items):
        raise ValueError(f"n_train={n_train}, n_val={n_val}, n_test={n_test}: need ≥ 1 each and at most "
                         f"{len(items)} in all")
    g = torch.Generator().manual_seed(seed)
    order = [items[i] for i in torch.randperm(len(items), generator=g)[: n_val + n_test + n_train].tolist()]
    return {"train": [example(x) for x in order[n_val + n_test :]], "val": [example(x) for x in order[:n_val]],
            "test": [example(x) for x in order[n_val : n_val + n_test]]}


def add_task(seed: int = 0, n_val: int = 20, n_test: int = 20, n_train: int = 600) -> dict[str, list[tuple[str, str]]]:
    """Two-digit addition, ``"32 + 76 ="`` → ``" 108"``: arithmetic, not a word operation. The (a, b) pairs of the
    three splits are disjoint (drawn from ``seed``); SmolLM2-135M-Instruct answers none right before fine-tuning
    (the benchmark measures it on every run).

    Raises:
        ValueError: a split size < 1, or more examples asked than the 8,100 pairs.
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    return _splits(pairs, n_val, n_test, n_train, seed, lambda p: (f"{p[0]} + {p[1]} =", f" {p[0] + p[1]}"))


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def date_task(seed: int = 0, n_val: int = 20, n_test: int = 20, n_train: int = 600) -> dict[str, list[tuple[str, str]]]:
    """Reformat a written date as ISO 8601, ``"Date: 28 September 1960. ISO:"`` → ``" 1960-09-28"``: a formatting
    task (copy the year and day, map the month to its number, pad). Dates of the three splits are disjoint.

    Raises:
        ValueError: a split size < 1, or more examples asked than the dates available.
    """
    dates = [(y, m, d) for y in range(1950, 2030) for m in range(1, 13) for d in range(1, 29)]
    return _splits(dates, n_val, n_test, n_train, seed,
                   lambda t: (f"Date: {t[2]} {MONTHS[t[1] - 1]} {t[0]}. ISO:", f" {t[0]}-{t[1]:02d}-{t[2]:02d}"))


TASKS = {"code": code_task, "swap": swap_task, "add": add_task, "date": date_task}
