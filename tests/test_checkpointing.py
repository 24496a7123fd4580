"""transformers' gradient checkpointing with injected adapters and dropout: the recomputed forward redraws the
same dropout masks (seed from torch's CPU generator, whose state checkpointing restores), so gradients equal the
non-checkpointed run."""
import torch

import loranull_kernels as lk
from tests.helpers import assert_close
from tests.tiny_models import tiny_model, token_batches


def _grads(checkpointing: bool, batch, calls: list, seed: int = 123):
    model = tiny_model("llama")
    lk.inject(model, lk.AdapterConfig(method="lora", r=4, alpha=8, dropout=0.3,
                                      target_modules=["q_proj", "v_proj", "down_proj"], init_seed=0))
    with torch.no_grad():  # B = 0 at init would leave dA zero whatever the masks
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for m in model.modules():
        if isinstance(m, lk.LoRALinear):
            m.register_forward_hook(lambda *_: calls.append(1))
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    torch.manual_seed(seed)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_replays_dropout():
    batch = token_batches(1)[0]
    plain_calls, ckpt_calls = [], []
    with lk.backend.use("torch"):
        ref = _grads(False, batch, plain_calls)
        got = _grads(True, batch, ckpt_calls)
    # checkpointing did recompute adapters (non-reentrant recomputation may stop once the last needed tensor is back)
    assert len(ckpt_calls) > len(plain_calls)
    assert ref.keys() == got.keys() and ref
    for n in ref:
        assert ref[n].abs().max() > 0, n
        assert_close(got[n], ref[n], torch.float32, n)


def test_masks_move_gradients():
    """Guards the test above: another seed gives other masks and other gradients, so equal gradients there mean
    equal masks."""
    batch = token_batches(1)[0]
    with lk.backend.use("torch"):
        a = _grads(False, batch, [], seed=123)
        b = _grads(False, batch, [], seed=124)
    assert any(not torch.allclose(a[n], b[n], atol=1e-4) for n in a)
