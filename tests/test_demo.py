"""The demo of the main job learns the hidden low-rank change (an end-to-end check of the op in training)."""
import loranull_kernels as lk
from loranull_kernels import demo


def test_demo_recovers_the_hidden_update():
    with lk.backend.use("torch"):
        summary = demo.run(steps=300)
    assert summary["last_loss"] < 0.2 * summary["first_loss"]
    assert summary["delta_rel_error"] < 0.05, summary
