"""Question-answer examples as causal-LM batches, and exact-match scoring, for the forgetting benchmark.

An example is ``(prompt, answer)`` in the word-level language of :mod:`loranull_kernels.bench.world`. The model reads
``prompt answer <eos>``; training puts the loss on the answer and ``<eos>`` only, and an answer counts as recalled
when the model's greedy continuation of the prompt is exactly ``answer <eos>``. Teacher-forced argmax at every
answer position equals greedy decoding as long as every earlier token was right, so one forward pass scores it.
"""
from __future__ import annotations

import torch
from torch import nn

from .world import Vocab

IGNORE = -100  # transformers' label for "no loss here"


def encode(vocab: Vocab, examples: list[tuple[str, str]], with_answer: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids`` and ``attention_mask`` (n, T) int64, and ``labels`` (n, T) with the loss on
    the answer and ``<eos>`` (``IGNORE`` elsewhere). ``with_answer=False``: prompts only (no labels), e.g. to
    calibrate on questions."""
    rows, labels = [], []
    for prompt, answer in examples:
        p = vocab.encode(prompt)
        a = vocab.encode(answer) + [vocab.eos_id] if with_answer else []
        rows.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    return pad(rows, labels, vocab.pad_id, with_answer)


def pad(rows: list[list[int]], labels: list[list[int]], pad_id: int, with_labels: bool = True) -> dict:
    """Right-pad token rows and their labels (``IGNORE`` where no loss) into the batch :func:`encode` returns:
    ``input_ids``, ``attention_mask`` and (``with_labels``) ``labels``, each (n, longest row) int64."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        batch["labels"] = lab
    return batch


def rows(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``idx`` of an :func:`encode`d batch, trimmed to their longest row: the same tensors as encoding just
    those examples, without re-encoding them on every training step."""
    width = int(batch["attention_mask"][idx].sum(1).max())
    return {k: v[idx, :width] for k, v in batch.items()}


@torch.no_grad()
def exact_match(model: nn.Module, vocab: Vocab, examples: list[tuple[str, str]], batch_size: int = 512) -> torch.Tensor:
    """Per example, whether greedy decoding after the prompt gives exactly ``answer <eos>``: a bool tensor (n,).
    The model is put in eval mode for the call and its mode restored."""
    return batched_hits(model, examples, lambda part: encode(vocab, part), _hits, batch_size)


def _hits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted = logits[:, :-1].argmax(-1)
    target = batch["labels"][:, 1:]
    scored = target != IGNORE
    return ((predicted == target) | ~scored).all(-1)


@torch.no_grad()
def batched_hits(model: nn.Module, examples: list, encoder, hits, batch_size: int) -> torch.Tensor:
    """``hits(model, encoder(chunk))`` (a bool per example) over ``examples`` in chunks of ``batch_size``, in eval
    mode (the model's mode restored after), on the model's device; concatenated on the CPU: bool (n,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in encoder(examples[i : i + batch_size]).items()}
            out.append(hits(model, batch).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
