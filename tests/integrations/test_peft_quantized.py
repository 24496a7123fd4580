"""lk.integrations.peft.patch over quantized bases: PEFT's own QLoRA layers (bitsandbytes 4-bit and 8-bit) and
torchao bases run the fused op with PEFT's outputs and gradients; a base no kind reads is left to PEFT, with one
log line, and the model keeps working."""
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.integrations.conftest import require

peft = require("peft")
require("bitsandbytes")
from peft import LoraConfig, get_peft_model  # noqa: E402

import loranull_kernels as lk  # noqa: E402
from loranull_kernels.integrations import peft as lkpeft  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.quantized_models import quantized_model, torchao_model  # noqa: E402
from tests.tiny_models import token_batches  # noqa: E402

BATCH = token_batches(1, batch=2, seq=10)[0]


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def _peft(model, **cfg):
    cfg.setdefault("target_modules", "all-linear")
    cfg.setdefault("init_lora_weights", False)  # nonzero B: the adapter path shows in outputs and gradients
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **cfg))


def _run(model):
    model.train()  # no dropout here; training mode also puts int8 bases on bitsandbytes' dequantizing path
    out = model(**BATCH).logits
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _compare(model, fused_calls, tol=2e-5):
    ref_out, ref_grads = _run(model)
    lkpeft.patch(model)
    out, grads = _run(model)
    assert len(fused_calls) == 14, "every LoRA layer of the two blocks must run the fused op"
    assert_close(out, ref_out, torch.float32, "logits", tol)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert_close(grads[n], ref_grads[n], torch.float32, n, tol)


@pytest.mark.parametrize("quant", ["nf4", "nf4-nested", "fp4", "int8"])
def test_bitsandbytes_lora_layers_run_fused_and_match_peft(quant, fused_calls):
    model = _peft(quantized_model(quant))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    _compare(model, fused_calls)


def test_bitsandbytes_dropout_runs_fused(fused_calls):
    model = _peft(quantized_model("nf4-nested"), lora_dropout=0.1)
    lkpeft.patch(model)
    model.train()
    model(**BATCH, labels=BATCH["input_ids"]).loss.backward()
    assert len(fused_calls) == 14


def test_patch_switches_the_cpu_repacking_off_before_any_forward(fused_calls):
    """PEFT's own fallback forwards (adapters disabled, merged, several active) run bitsandbytes' eval forward, which
    would repack the 4-bit weights on AVX512-BF16 CPUs: patch switches that off on every base, and the weights keep
    the layout they were loaded in through such a forward, on any CPU."""
    from tests.quantized_models import is_packed

    model = _peft(quantized_model("nf4-nested", repacking=True))
    lkpeft.patch(model)
    bases = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(bases) == 14 and not any(m.support_avx512bf16_for_cpu for m in bases)
    model.eval()
    with torch.no_grad(), model.disable_adapter():  # PEFT's own forward, eval mode, no grad
        model(**BATCH)
    assert not is_packed(model) and not fused_calls


def test_torchao_base_runs_fused_instead_of_breaking(fused_calls):
    """A torchao-quantized nn.Linear passes ``isinstance(nn.Linear)``: it used to be patched as a dense base and
    fail in the custom op. It now runs on its dequantized weight, with PEFT's results."""
    from torchao.quantization import Int8WeightOnlyConfig

    base = torchao_model()
    # What transformers attaches to a model loaded with TorchAoConfig; PEFT < 0.20 requires it for torchao bases.
    base.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(
        get_apply_tensor_subclass=Int8WeightOnlyConfig))
    model = _peft(base)
    _compare(model, fused_calls)


class _CustomQuantLinear(nn.Linear):
    """A quantizer's layer no kind knows: an int8 weight and its own forward."""

    def __init__(self, lin):
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None)
        self.weight = nn.Parameter(torch.round(lin.weight.detach() * 100).to(torch.int8), requires_grad=False)
        self.bias = lin.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() / 100, self.bias)


def test_a_base_no_kind_reads_falls_back_with_one_log_line(fused_calls, caplog):
    base = quantized_model("nf4")
    proj = base.model.layers[0].mlp.down_proj
    lin = nn.Linear(proj.in_features, proj.out_features, bias=False)
    base.model.layers[0].mlp.down_proj = _CustomQuantLinear(lin)
    model = _peft(base, target_modules=["q_proj", "down_proj"])
    ref, _ = _run(model)
    with caplog.at_level(logging.INFO, logger=lkpeft.__name__):
        lkpeft.patch(model)
        out, _ = _run(model)
        _run(model)
    fallbacks = [r for r in caplog.records if "down_proj" in r.getMessage() and "not a kind" in r.getMessage()]
    assert len(fallbacks) == 1  # logged once, not per call
    assert len(fused_calls) == 3 * 2  # both q_proj and block 1's 4-bit down_proj, in both runs
    assert_close(out, ref, torch.float32, "logits")
