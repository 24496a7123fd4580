"""What the fine-tuning tools' tests train on, written to disk as the tools read it: a tiny Llama with a
character-level tokenizer saved as a Hugging Face model folder (never downloaded), and an Alpaca-format data set."""
from __future__ import annotations

import json
import string
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-block Llama (hidden 64, GQA 4/2 heads) and a tokenizer with one token per printable character, saved
    with ``save_pretrained`` in ``path``. Returns ``path``."""
    import torch
    import transformers as tf
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                           pad_token="<pad>", unk_token="<unk>")
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_alpaca(path: Path, n: int = 16) -> Path:
    """``n`` Alpaca records (instruction / input / output) as a JSON list in ``path``. Returns ``path``."""
    records = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "Show the sum.",
                "output": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


# The decoder's linear layers a LoRA with all linear targets adapts: q/k/v/o and gate/up/down, per block.
LINEARS_PER_BLOCK, BLOCKS = 7, 2
