"""Every tensor argument of ``lora_linear`` on the torch backend laid out non-contiguous, transposed, at a storage
offset and expanded (stride 0), against the float64 reference (the check itself: ``layouts.py``)."""
import pytest
import torch

from .layouts import LAYOUTS, check_lora_linear_in_layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3, 0.8])  # 0.8: the dense kept-entries path
def test_torch_backend_every_argument_in_layout(layout, dropout_p, dtype):
    # A seed above 2**32: its high bits must be used, and the same mask regenerated in backward.
    check_lora_linear_in_layout("torch", layout, dropout_p, dtype, "cpu", (11, 19, 13, 4), 0.7, seed=2**40 + 17)
