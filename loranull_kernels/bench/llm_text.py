"""Prompt-answer examples as token batches for a real tokenizer, the loss on the answer tokens, and exact match.

An example is ``(prompt, answer)`` with the answer's leading space included (``("The capital of France is",
" Paris")``). The prompt is tokenised with the tokenizer's special tokens, the answer without, and the two are
concatenated, so the answer's tokens are the same in every context. Only the answer positions reach the LM head
(:func:`answer_logits`): on a 49k-token vocabulary the head is a fifth of a small model's compute, and the prompt's
logits are never used. An answer counts as known when the argmax at every answer position is the answer's next
token (teacher-forced exact match: equal to greedy decoding of the answer's tokens, one forward pass).
"""
from __future__ import annotations

import torch
from torch import nn

from . import qa
from .qa import IGNORE


def encode(tokenizer, examples: list[tuple[str, str]], with_answer: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids`` and ``attention_mask`` (n, T) int64 and, with answers, ``labels`` (n, T):
    the answer's token ids at their positions, ``IGNORE`` elsewhere (the transformers convention, so
    ``model(**batch).loss`` is the answer loss too). ``with_answer=False``: prompts only, no labels."""
    rows, labels = [], []
    for prompt, answer in examples:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] if with_answer else []
        if with_answer and not a:
            raise ValueError(f"empty answer for prompt {prompt!r}")
        rows.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    return qa.pad(rows, labels, tokenizer.pad_token_id, with_answer)


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an answer token: ``(logits (m, V), targets (m,), row (m,))`` for the
    batch's m answer tokens (``row``: which example each belongs to). The decoder runs on the whole batch, the LM
    head (``model.get_output_embeddings()``) on the m positions only."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[where]
    return model.get_output_embeddings()(hidden[:, :-1][where]), targets[where], rows


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's answer tokens (0-dim float32), through :func:`answer_logits`."""
    logits, targets, _ = answer_logits(model, batch)
    return nn.functional.cross_entropy(logits.float(), targets)


def answer_hits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row of an :func:`encode`d batch, whether the argmax at every answer position is the answer's token:
    bool (n,)."""
    logits, targets, rows = answer_logits(model, batch)
    wrong = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long, device=logits.device)
    wrong.index_add_(0, rows, (logits.argmax(-1) != targets).long())
    return wrong == 0


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, examples: list[tuple[str, str]], batch_size: int = 64) -> torch.Tensor:
    """Per example, whether the model's argmax at every answer position is the answer's token: bool (n,). The model
    is put in eval mode for the call and its mode restored."""
    return qa.batched_hits(model, examples, lambda part: encode(tokenizer, part), answer_hits, batch_size)
