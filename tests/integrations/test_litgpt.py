"""lk.integrations.litgpt: patched LitGPT LoRA layers (LoRALinear, LoRAQKVLinear with every q/k/v subset, MHA /
GQA / MQA) match LitGPT's own forward and gradients through the fused op, or fall back with one log line."""
import itertools
import logging

import pytest
import torch
from torch import nn

from tests.integrations.conftest import count_calls, require

require("litgpt")
from litgpt.lora import (GPT, Config, LoRALinear, LoRAQKVLinear, mark_only_lora_as_trainable,  # noqa: E402
                         merge_lora_weights)

import loranull_kernels as lk  # noqa: E402
from loranull_kernels.integrations import litgpt as lklit  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

VOCAB, SEQ = 64, 12
SUBSETS = [s for s in itertools.product((True, False), repeat=3) if any(s)]


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


@pytest.fixture
def fused_calls(monkeypatch):
    return count_calls(monkeypatch, lklit)


def _model(qkv=(True, True, True), n_query_groups=2, dtype=torch.float32, bias=False, dropout=0.0, train_base=False,
           **lora):
    cfg = Config(n_layer=2, n_head=4, n_query_groups=n_query_groups, n_embd=32, block_size=SEQ, vocab_size=VOCAB,
                 padded_vocab_size=VOCAB, mlp_class_name="LLaMAMLP", intermediate_size=48, bias=bias,
                 lora_r=4, lora_alpha=8, lora_dropout=dropout, lora_query=qkv[0], lora_key=qkv[1], lora_value=qkv[2],
                 **{"lora_projection": True, "lora_mlp": True, "lora_head": True, **lora})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # LitGPT zeroes B: give it values, so the adapter path shows in outputs and in dA
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.r > 0 and hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.2)
    if not train_base:
        mark_only_lora_as_trainable(model, bias="all" if bias else "none")
    return model.to(dtype).eval()


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ))


def _run(model, idx):
    out = model(idx)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _op_calls_per_forward(model) -> int:
    """The op calls one forward of ``model`` must make: one per LoRALinear, one per enabled q/k/v part."""
    n = 0
    for m in model.modules():
        if isinstance(m, LoRAQKVLinear):
            n += sum(m.enable_lora) if m.r > 0 else 0
        elif isinstance(m, LoRALinear):
            n += m.r > 0
    return n


def _compare(model, fused_calls, dtype=torch.float32, tol=None):
    idx = _tokens()
    ref_out, ref_grads = _run(model, idx)
    lklit.patch(model)
    out, grads = _run(model, idx)
    assert len(fused_calls) == _op_calls_per_forward(model) > 0
    assert_close(out, ref_out, dtype, "logits", tol)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert_close(grads[n], ref_grads[n], dtype, n, tol)


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("qkv", SUBSETS, ids=["".join("qkv"[i] for i in range(3) if s[i]) for s in SUBSETS])
def test_every_qkv_subset_matches_litgpt(qkv, groups, fused_calls):
    _compare(_model(qkv, groups), fused_calls)


def test_bias_trained_and_head_only(fused_calls):
    """Trainable biases (``mark_only_lora_as_trainable(bias="all")``) get LitGPT's gradients; a model with LoRA on
    some layers only still counts every adapter."""
    model = _model((False, True, False), 2, bias=True, lora_mlp=False)
    assert any(n.endswith("linear.bias") for n, p in model.named_parameters() if p.requires_grad)
    _compare(model, fused_calls)


def test_bf16_model(fused_calls):
    _compare(_model((True, False, True), 2, dtype=torch.bfloat16), fused_calls, torch.bfloat16)


def test_float32_model_under_bf16_autocast(fused_calls):
    model = _model((True, True, False), 1)
    idx = _tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_grads = _run(model, idx)
        lklit.patch(model)
        out, grads = _run(model, idx)
    assert len(fused_calls) == _op_calls_per_forward(model)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert_close(out, ref_out, torch.bfloat16, "logits")
    for n in grads:
        assert grads[n].dtype == torch.float32
        assert_close(grads[n], ref_grads[n], torch.bfloat16, n)


def test_patch_uses_views_of_the_weights():
    """Every tensor the op gets for a q/k/v part shares storage with the layer's parameters (no weight is copied),
    and the part's gradients land in the right rows of lora_A / lora_B."""
    model = _model((True, False, True), 2)
    layer = model.transformer.h[0].attn.qkv
    seen = []
    real = lklit.lora_linear

    def spy(x, W, A, B, *a, **k):
        seen.append((W, A, B))
        return real(x, W, A, B, *a, **k)

    lklit.patch(model)
    x = torch.randn(3, 32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lklit, "lora_linear", spy)
        layer(x).sum().backward()
    assert len(seen) == 2
    for W, A, B in seen:
        assert W.untyped_storage().data_ptr() == layer.linear.weight.untyped_storage().data_ptr()
        assert A.untyped_storage().data_ptr() == layer.lora_A.untyped_storage().data_ptr()
        assert B.untyped_storage().data_ptr() == layer.lora_B.untyped_storage().data_ptr()
    q = layer.head_size * layer.n_head
    assert seen[0][2].shape[0] == q and seen[1][2].shape[0] == layer.lora_B.shape[0] - q
    assert layer.lora_A.grad.abs().sum(1).gt(0).all()  # both rank blocks got gradients


def test_qkv_parts_share_one_dropout_mask(fused_calls):
    """LitGPT drops the same input entries for q, k and v: with equal q and k weights and adapters, their outputs
    are equal under dropout, and differ from an eval-mode forward."""
    model = _model((True, True, False), 4, dropout=0.5)
    layer = model.transformer.h[0].attn.qkv
    q = layer.head_size * layer.n_head
    r = layer.r
    with torch.no_grad():
        layer.linear.weight[q:2 * q] = layer.linear.weight[:q]
        layer.lora_A[r:2 * r] = layer.lora_A[:r]
        layer.lora_B[q:2 * q] = layer.lora_B[:q]
    lklit.patch(model)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = layer(x)
        layer.train()
        y = layer(x)
    assert len(fused_calls) == 4
    assert torch.equal(y[:, :q], y[:, q:2 * q])
    assert not torch.allclose(y, expected)


class _QuantLinear(nn.Linear):
    """Stands for Lightning's bitsandbytes layers: an nn.Linear subclass with its own forward."""

    def forward(self, x):
        return super().forward(x)


def _fallback(model, fused_calls, caplog, reason, n_layers):
    idx = _tokens()
    with torch.no_grad():
        ref = model(idx)
        with caplog.at_level(logging.INFO, logger=lklit.__name__):
            lklit.patch(model)
            out = model(idx)
            model(idx)
    assert not fused_calls
    assert torch.equal(out, ref)
    msgs = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(msgs) == n_layers  # once per layer, not once per call


def test_merged_layers_fall_back(fused_calls, caplog):
    model = _model()
    merge_lora_weights(model)
    _fallback(model, fused_calls, caplog, "merged", 2 * 5 + 1)


def test_trainable_base_falls_back(fused_calls, caplog):
    _fallback(_model(train_base=True), fused_calls, caplog, "base weight is trainable", 2 * 5 + 1)


def test_quantized_base_falls_back(fused_calls, caplog):
    model = _model()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            q = _QuantLinear(m.linear.in_features, m.linear.out_features, bias=False)
            q.load_state_dict(m.linear.state_dict())
            q.requires_grad_(False)
            m.linear = q
    _fallback(model, fused_calls, caplog, "_QuantLinear (quantized", 2 * 5 + 1)


def test_unpatch_and_idempotent_patch(fused_calls):
    model = _model()
    idx = _tokens()
    with torch.no_grad():
        lklit.patch(lklit.patch(model))
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert layers and all(lklit.is_patched(m) for m in layers)
        patched = model(idx)
        assert len(fused_calls) == _op_calls_per_forward(model)  # patched twice, still one op call per adapter
        lklit.unpatch(model)
        assert not any(lklit.is_patched(m) for m in layers)
        assert torch.allclose(model(idx), patched, atol=1e-5)
    assert len(fused_calls) == _op_calls_per_forward(model)


def test_training_steps_follow_litgpt(fused_calls):
    """A few AdamW steps on the patched model track the unpatched one (tolerances, not bit equality)."""
    losses = {}
    for patched in (False, True):
        model = _model((True, False, True), 2).train()
        if patched:
            lklit.patch(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(3)
        idx = _tokens()
        run = []
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses[patched] = run
    assert len(fused_calls) == 4 * _op_calls_per_forward(model)
    assert losses[True][-1] < losses[True][0]
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))


def test_reachable_from_package():
    assert lk.integrations.litgpt.patch is lklit.patch


def test_patch_new_layers_patches_models_built_afterwards(fused_calls, monkeypatch):
    """What ``python -m loranull_kernels.integrations.litgpt finetune_lora ...`` relies on: LitGPT builds the model
    itself, every LoRA layer it builds is patched (the constructors are restored after the test)."""
    for cls in (LoRALinear, LoRAQKVLinear):
        monkeypatch.setattr(cls, "__init__", cls.__init__)
    monkeypatch.setattr(lklit, "_ORIGINAL_INITS", {})
    before = _model()
    lklit.patch_new_layers()
    lklit.patch_new_layers()  # idempotent: one wrapper
    model = _model()
    assert not any(lklit.is_patched(m) for m in before.modules())
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(lklit.is_patched(m) for m in layers)
    with torch.no_grad():
        model(_tokens())
    assert len(fused_calls) == _op_calls_per_forward(model)
