"""Tiny Llama models with quantized bases, built from a config and never downloaded: the float32 model is saved once
per session and reloaded by transformers with a ``BitsAndBytesConfig`` (the path a QLoRA user takes), or quantized
in place with torchao's ``quantize_``.

The sizes are multiples of bitsandbytes' 64-element blocks and of its CPU repacking's 32-row tiles (hidden 64,
MLP 128): bitsandbytes' own CPU repacking fails on other sizes, and the tests must be able to trigger it.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

VOCAB = 96
QUANTS = ("nf4", "nf4-nested", "fp4", "int8")

_SAVED: dict = {}


def _float_dir(seed: int) -> str:
    """A folder holding the float32 tiny Llama drawn from ``seed`` (saved once per session)."""
    if seed not in _SAVED:
        import transformers as tf

        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             initializer_range=0.1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tf.LlamaForCausalLM(cfg)
        path = tempfile.mkdtemp(prefix=f"loranull-tiny-llama-{seed}-")
        model.save_pretrained(path)
        _SAVED[seed] = path
    return _SAVED[seed]


def float_model(seed: int = 0):
    """The float32 model the quantized ones were quantized from (eval mode)."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(_float_dir(seed), dtype=torch.float32).eval()


def quantized_model(quant: str, seed: int = 0, repacking: bool = False):
    """The tiny Llama loaded by transformers with ``quant`` ("nf4", "nf4-nested", "fp4", "int8") bitsandbytes
    weights on the CPU, in eval mode. ``repacking``: leave bitsandbytes' CPU repacking of 4-bit weights on (its
    default on CPUs with AVX512-BF16; forced on here so both layouts are tested on every CPU); False switches it
    off on every layer."""
    pytest.importorskip("bitsandbytes")
    import transformers as tf

    if quant == "int8":
        qcfg = tf.BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.split("-")[0],
                                     bnb_4bit_use_double_quant=quant.endswith("nested"),
                                     bnb_4bit_compute_dtype=torch.float32)
    model = tf.AutoModelForCausalLM.from_pretrained(_float_dir(seed), dtype=torch.float32, quantization_config=qcfg,
                                                    device_map="cpu").eval()
    set_repacking(model, repacking)
    return model


def set_repacking(model, on: bool) -> None:
    """Switch bitsandbytes' CPU repacking of 4-bit weights on or off on every ``Linear4bit`` of ``model``."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = on


def repack_for_cpu(module) -> None:
    """Do to a ``Linear4bit`` what bitsandbytes' first eval-mode no-grad CPU forward does on AVX512-BF16 CPUs,
    whatever this CPU is (the repacking itself is plain PyTorch)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(module.weight.data,
                                                                                 module.weight.quant_state)
    module.quant_state = module.weight.quant_state


def torchao_model(seed: int = 0):
    """The float tiny Llama with every decoder linear quantized by torchao (int8 weight-only), eval mode."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = float_model(seed)
    quantize_(model.model.layers, Int8WeightOnlyConfig())
    return model


def is_packed(model) -> bool:
    """Whether any ``Linear4bit`` of ``model`` holds bitsandbytes' CPU-repacked layout."""
    return any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
               for m in model.modules())


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def reference_logits(model, batch) -> torch.Tensor:
    """The quantized model's own logits, as the fused op computes them: for int8 bases bitsandbytes' training path
    (``x · dequantize(W)ᵀ``); its inference path also rounds the activations to int8 (1.8% relative on these
    logits), which the fused op does not. The tiny models have no dropout, so training mode changes nothing else."""
    was_training = model.training
    model.train()
    try:
        return logits(model, batch)
    finally:
        model.train(was_training)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def clear() -> None:
    """Delete the saved models (``tests/conftest.py`` calls it when the session ends)."""
    import shutil

    for path in _SAVED.values():
        shutil.rmtree(path, ignore_errors=True)
    _SAVED.clear()


__all__ = ["QUANTS", "VOCAB", "float_model", "quantized_model", "torchao_model", "set_repacking", "repack_for_cpu",
           "is_packed", "logits", "reference_logits", "relative", "clear"]
