"""Tiny randomly initialised Hugging Face models built from configs (never downloaded), and batches for them."""
from __future__ import annotations

import copy

import torch

VOCAB = 96
HIDDEN = 64
KINDS = ("llama", "qwen2", "mistral", "bert")

_CACHE: dict = {}


def _build(kind: str):
    import transformers as tf

    # A larger init scale than the default 0.02 so every layer changes the output visibly.
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, initializer_range=0.1)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    if kind == "qwen2":  # q/k/v have biases
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common))
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(**common))
    if kind == "bert_cls":
        return tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **common))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                                                initializer_range=0.1, bos_token_id=0, eos_token_id=0))
    raise ValueError(kind)


def tiny_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A fresh copy (eval mode) of the tiny ``kind`` model with weights drawn from ``seed``, in ``dtype``."""
    key = (kind, seed)
    if key not in _CACHE:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _CACHE[key] = _build(kind).eval()
    return copy.deepcopy(_CACHE[key]).to(dtype)


def output(model, batch) -> torch.Tensor:
    """The model's main output tensor (logits, or the last hidden state for encoders)."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def token_batches(n: int, batch: int = 2, seq: int = 12, vocab: int | list = VOCAB, seed: int = 0, mask: bool = True):
    """``n`` dict batches of random token ids (from ``range(vocab)`` or the given token list), all-ones mask."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(vocab) if isinstance(vocab, int) else torch.tensor(vocab)
    out = []
    for _ in range(n):
        ids = pool[torch.randint(0, len(pool), (batch, seq), generator=g)]
        b = {"input_ids": ids}
        if mask:
            b["attention_mask"] = torch.ones_like(ids)
        out.append(b)
    return out


def capture_inputs(model, module_type):
    """Forward pre-hooks recording every input of the modules of ``module_type``: returns (records, remove)."""
    records: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, module_type):
            def hook(mod, args, name=name):
                records.setdefault(name, []).append(args[0].detach().clone())
            handles.append(m.register_forward_pre_hook(hook))

    def remove():
        for h in handles:
            h.remove()

    return records, remove
