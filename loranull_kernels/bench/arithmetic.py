"""The new task of the forgetting benchmark: addition, in the pre-trained model's ``Q : ... A :`` format.

``"Q : what is 4 7 plus 9 ? A :"`` → ``"5 6"``: one token per digit, most significant first. The pre-trained
model (:mod:`loranull_kernels.bench.pretrain`) knows digits only as populations and has never added, so it starts
near 0%; and because the questions look like its fact questions and the answers like its populations, fine-tuning
on them competes with the facts for the same answer slot, which is what makes forgetting possible.
"""
from __future__ import annotations

import random


def _digits(n: int) -> str:
    return " ".join(str(n))


def example(a: int, b: int) -> tuple[str, str]:
    """``(prompt, answer)`` for ``a + b``."""
    return f"Q : what is {_digits(a)} plus {_digits(b)} ? A :", _digits(a + b)


def splits(digits: tuple[int, int] = (2, 1), n_val: int = 200, n_test: int = 200,
           seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Disjoint ``train`` / ``val`` / ``test`` lists of examples over every pair ``a + b`` with ``a`` of up to
    ``digits[0]`` digits and ``b`` of up to ``digits[1]`` (no leading zeros: 7 + 4 is "7 plus 4"); validation picks
    learning rates, test is reported. The default, two digits plus one, is learnt to a useful but not perfect
    accuracy by a rank-8 adapter in a few hundred steps on the benchmark's model: room to see both learning and
    forgetting."""
    if len(digits) != 2 or min(digits) < 1:
        raise ValueError(f"digits must be two positive ints, got {digits}")
    pairs = [(a, b) for a in range(10 ** digits[0]) for b in range(10 ** digits[1])]
    random.Random(seed).shuffle(pairs)
    if n_val < 1 or n_test < 1 or n_val + n_test >= len(pairs):
        raise ValueError(f"n_val = {n_val} and n_test = {n_test} must be ≥ 1 and leave training pairs of the "
                         f"{len(pairs)} available")
    test, val, train = pairs[:n_test], pairs[n_test : n_test + n_val], pairs[n_test + n_val :]
    return {name: [example(a, b) for a, b in part] for name, part in (("train", train), ("val", val), ("test", test))}
