"""The demo of the main job learns the hidden low-rank change (an end-to-end check of the op in training)."""
import loranull_kernels as lk
from loranull_kernels import demo


def test_demo_recovers_the_hidden_update():
    with lk.backend.use("torch"):
        summary = demo.run(steps=300)
    assert summary["last_loss"] < 0.2 * summary["first_loss"]
    assert summary["delta_rel_error"] < 0.05, summary


def test_model_demo_lora_null_preserves_knowledge_better_than_lora():
    with lk.backend.use("torch"):
        out = demo.run_model(steps=12, progress=False)
    null, lora = out["lora_null"], out["lora"]
    for m in (null, lora):
        assert m["last_loss"] < m["first_loss"], out  # both learn the new task
    assert null["leak"] < 0.1 * lora["leak"], out
    assert null["knowledge_drift"] < 0.5 * lora["knowledge_drift"], out
    assert null["trainable"] < lora["trainable"]  # v2 trains B only
