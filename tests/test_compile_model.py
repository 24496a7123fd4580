"""A tiny Llama with injected adapters compiles with fullgraph=True (inductor, CPU), forward and backward."""
import pytest
import torch

import loranull_kernels as lk
from tests.helpers import assert_close
from tests.tiny_models import tiny_model, token_batches


def _adapted_llama():
    model = tiny_model("llama")
    model.model.layers = model.model.layers[:1]  # one decoder layer: half the compile time, same code paths
    model.config.num_hidden_layers = 1
    lk.inject(model, lk.AdapterConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_seed=0))
    with torch.no_grad():  # B = 0 at init would hide dA
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model


def _loss_and_grads(fn, model, batch):
    loss = fn(batch["input_ids"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.slow
def test_llama_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    model = _adapted_llama()
    batch = token_batches(1)[0]

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    with lk.backend.use("torch"):
        ref_loss, ref_grads = _loss_and_grads(loss_fn, model, batch)
        compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
        loss, grads = _loss_and_grads(compiled, model, batch)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert len(grads) == 2 * 3  # A and B of 3 targets
    for n in grads:
        assert ref_grads[n].abs().max() > 0, n
        assert_close(grads[n], ref_grads[n], torch.float32, n, tol=1e-4)
