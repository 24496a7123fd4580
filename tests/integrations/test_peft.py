"""lk.integrations.peft: patched PEFT LoRA layers match PEFT's own forward/backward, or fall back with a log."""
import logging

import pytest
import torch

from tests.integrations.conftest import require

peft = require("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLinear  # noqa: E402
from peft.tuners.lora import config as peft_lora_config  # noqa: E402
from peft.tuners.lora import variants as peft_lora_variants  # noqa: E402

import loranull_kernels as lk  # noqa: E402
from loranull_kernels.integrations import peft as lkpeft  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.tiny_models import output, tiny_model, token_batches  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def _peft_model(kind="llama", dtype=torch.float32, **cfg):
    cfg.setdefault("target_modules", TARGETS)
    cfg.setdefault("init_lora_weights", False)  # nonzero B, so the adapter path shows in outputs and dA
    torch.manual_seed(1)
    # eval(): PEFT creates its dropout modules in training mode
    return get_peft_model(tiny_model(kind, dtype=dtype), LoraConfig(**cfg)).eval()


def _run(model, batch):
    out = output(model, batch)
    loss = out.float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _compare(model, batch, dtype, fused_calls, expect_fused=True, tol=None):
    ref_out, ref_grads = _run(model, batch)
    lkpeft.patch(model)
    out, grads = _run(model, batch)
    assert (len(fused_calls) > 0) == expect_fused
    assert_close(out, ref_out, dtype, "output", tol)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert_close(grads[n], ref_grads[n], dtype, n, tol)


@pytest.mark.parametrize("cfg", [
    dict(r=4, lora_alpha=8),
    dict(r=8, lora_alpha=4, use_rslora=True),
    dict(r=4, lora_alpha=16, lora_dropout=0.1),  # compared in eval mode: dropout off on both sides
    dict(r=4, lora_alpha=8, init_lora_weights="pissa"),
    pytest.param(dict(r=4, lora_alpha=8, kasa="KasaConfig"),
                 marks=pytest.mark.skipif(not hasattr(peft_lora_config, "KasaConfig"),
                                          reason=f"peft {peft.__version__} has no KaSA (added in 0.21)")),
    pytest.param(dict(r=4, lora_alpha=4, init_lora_weights="mica"),
                 marks=pytest.mark.skipif(not hasattr(peft_lora_variants, "MiCALinearVariant"),
                                          reason=f"peft {peft.__version__} has no MiCA (added in 0.22)")),
], ids=["lora", "rslora", "dropout-eval", "pissa", "kasa", "mica"])
def test_matches_peft_fp32(cfg, fused_calls):
    if "kasa" in cfg:
        cfg = {**{k: v for k, v in cfg.items() if k != "kasa"}, "kasa_config": peft_lora_config.KasaConfig()}
    model = _peft_model(**cfg)
    for layer in model.modules():
        if isinstance(layer, PeftLinear):
            if "kasa_config" in cfg:  # the diagonal must take part in the comparison
                layer.lora_diag["default"].data.uniform_(0.5, 1.5)
            if cfg.get("init_lora_weights") == "mica":  # A starts at 0; B (frozen) must get no gradient
                layer.lora_A["default"].weight.data.normal_(0, 0.1)
                assert not layer.lora_B["default"].weight.requires_grad
    _compare(model, token_batches(1)[0], torch.float32, fused_calls)


def test_bias_lora_only_qwen2(fused_calls):
    model = _peft_model("qwen2", r=4, lora_alpha=8, bias="lora_only", target_modules=["q_proj", "k_proj", "v_proj"])
    assert any(n.endswith("q_proj.base_layer.bias") for n, p in model.named_parameters() if p.requires_grad)
    _compare(model, token_batches(1)[0], torch.float32, fused_calls)


def test_gpt2_conv1d_fan_in_fan_out(fused_calls):
    model = _peft_model("gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    _compare(model, token_batches(1)[0], torch.float32, fused_calls)


def test_bf16_base_fp32_adapters(fused_calls):
    model = _peft_model(dtype=torch.bfloat16, r=4, lora_alpha=8)
    layer = next(m for m in model.modules() if isinstance(m, PeftLinear))
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    _compare(model, token_batches(1)[0], torch.bfloat16, fused_calls)


def test_dropout_train_mode_is_unbiased(fused_calls):
    """Masks differ from PEFT's, so compare the expectation: the mean over many rows equals the eval output."""
    model = _peft_model(r=4, lora_alpha=8, lora_dropout=0.3)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    lkpeft.patch(model)
    x = torch.randn(1, 64).expand(20000, 64).contiguous()
    layer.eval()
    with torch.no_grad():
        expected = layer(x[:1])
        layer.train()
        y = layer(x)
    assert fused_calls
    assert not torch.allclose(y[0], y[1])  # dropout is active
    delta = y - expected
    stderr = delta.std(0) / len(y) ** 0.5
    assert (delta.mean(0).abs() < 5 * stderr + 1e-6).all()


def _fallback(model, batch, fused_calls, caplog, reason):
    ref = output(model, batch).detach()
    with caplog.at_level(logging.INFO, logger=lkpeft.__name__):
        lkpeft.patch(model)
        out = output(model, batch).detach()
        output(model, batch)
    assert not fused_calls
    assert torch.equal(out, ref)
    msgs = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    n_layers = sum(isinstance(m, PeftLinear) for m in model.modules())
    assert len(msgs) == n_layers  # once per layer, not once per call


def test_dora_falls_back(fused_calls, caplog):
    _fallback(_peft_model(r=4, lora_alpha=8, use_dora=True), token_batches(1)[0], fused_calls, caplog, "DoraLinearVariant")


def test_merged_falls_back(fused_calls, caplog):
    model = _peft_model(r=4, lora_alpha=8)
    for m in model.modules():
        if isinstance(m, PeftLinear):
            m.merge()
    _fallback(model, token_batches(1)[0], fused_calls, caplog, "merged")


def test_zero3_partitioned_layers_fall_back(fused_calls, caplog):
    """ZeRO-3 marks each parameter it partitions with ds_id and gathers it only when its own module is called: the
    fused path, which reads the weights without calling the base or lora_A / lora_B, must leave such layers to PEFT."""
    model = _peft_model(r=4, lora_alpha=8)
    for m in model.modules():
        if isinstance(m, PeftLinear):
            m.get_base_layer().weight.ds_id = 1  # all that marks a ZeRO-3 parameter here (gathered or not)
    _fallback(model, token_batches(1)[0], fused_calls, caplog, "ZeRO-3")


def test_two_active_adapters_fall_back(fused_calls, caplog):
    model = _peft_model(r=4, lora_alpha=8)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    _fallback(model, token_batches(1)[0], fused_calls, caplog, "2 active adapters")


def test_other_lora_layer_types_are_logged(fused_calls, caplog):
    model = _peft_model(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    with caplog.at_level(logging.INFO, logger=lkpeft.__name__):
        lkpeft.patch(model)
    assert any("embed_tokens" in r.getMessage() and "Embedding is not a LoRA linear layer" in r.getMessage()
               for r in caplog.records)
    output(model, token_batches(1)[0])
    assert len(fused_calls) == 2  # the two q_proj layers


def test_disabled_adapters_and_unpatch(fused_calls):
    model = _peft_model(r=4, lora_alpha=8)
    batch = token_batches(1)[0]
    with torch.no_grad():
        with model.disable_adapter():
            base = output(model, batch)
        lkpeft.patch(model)
        assert all(lkpeft.is_patched(m) for m in model.modules() if isinstance(m, PeftLinear))
        with model.disable_adapter():
            assert torch.equal(output(model, batch), base)
        assert not fused_calls
        adapted = output(model, batch)
        assert fused_calls and not torch.allclose(adapted, base)
        lkpeft.unpatch(model)
        n = len(fused_calls)
        assert torch.allclose(output(model, batch), adapted, atol=1e-5)
    assert len(fused_calls) == n
    assert not any(lkpeft.is_patched(m) for m in model.modules())


def test_reachable_from_package():
    assert lk.integrations.peft.patch is lkpeft.patch
    assert "integrations" in lk.__all__
