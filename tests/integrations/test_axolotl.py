"""axolotl: a tiny LoRA SFT run from a YAML config that lists ``LoRANullPlugin``; every PEFT LoRA layer runs the
fused op, and axolotl's own LoRA kernels (which would bypass it) stay off; a config asking for them is refused."""
import sys

import pytest
import yaml

from tests.integrations.conftest import require
from tests.integrations.tool_fixtures import BLOCKS, LINEARS_PER_BLOCK, save_tiny_llama, write_alpaca

STEPS = 2
PLUGIN = "loranull_kernels.integrations.axolotl.LoRANullPlugin"


@pytest.fixture
def axolotl(monkeypatch):
    # axolotl sends usage telemetry unless told not to, and the tests must reach no network (nor the hub)
    for var in ("AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return require("axolotl")


def _config(tmp_path, **extra) -> dict:
    return dict(base_model=str(save_tiny_llama(tmp_path / "model")), adapter="lora", lora_r=4, lora_alpha=8,
                lora_dropout=0.0, lora_target_linear=True, plugins=[PLUGIN],
                datasets=[dict(path=str(write_alpaca(tmp_path / "tiny.json")), ds_type="json", type="alpaca")],
                dataset_prepared_path=str(tmp_path / "prepared"), val_set_size=0, sequence_len=384,  # the Alpaca prompt is ~250 characters
                micro_batch_size=2, gradient_accumulation_steps=1, max_steps=STEPS, num_epochs=1,
                learning_rate=1e-3, optimizer="adamw_torch", lr_scheduler="constant", logging_steps=1,
                output_dir=str(tmp_path / "out"), save_strategy="no", bf16=False, fp16=False, tf32=False,
                special_tokens={"pad_token": "<pad>"}, **extra)


def _train(tmp_path, monkeypatch, **extra):
    from axolotl.cli.train import do_cli

    config = tmp_path / "axolotl.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, **extra)))
    monkeypatch.setattr(sys, "argv", ["axolotl"])
    do_cli(config=str(config))


@pytest.mark.slow
def test_yaml_run_trains_on_the_fused_op(axolotl, tmp_path, fused_calls, monkeypatch):
    from axolotl.monkeypatch import lora_kernels

    applied = []
    monkeypatch.setattr(lora_kernels, "apply_lora_kernel_patches", lambda *a, **k: applied.append(1))
    _train(tmp_path, monkeypatch)
    assert not applied, "axolotl's own LoRA kernels were applied: they bypass PEFT's layers"
    # every LoRA layer in every step's forward (the backward reuses the op's saved state: no extra call)
    assert len(fused_calls) >= STEPS * BLOCKS * LINEARS_PER_BLOCK
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_plugin_refuses_axolotl_lora_kernels(axolotl):
    from loranull_kernels.integrations.axolotl import LoRANullPlugin

    with pytest.raises(ValueError, match="lora_qkv_kernel: true"):
        LoRANullPlugin().register({"adapter": "lora", "lora_qkv_kernel": True})
    cfg = {"adapter": "lora", "lora_mlp_kernel": False}
    LoRANullPlugin().register(cfg)
    assert cfg == {"adapter": "lora", "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}


def test_plugin_refuses_a_model_without_lora_layers(axolotl):
    import torch

    from loranull_kernels.integrations.axolotl import LoRANullPlugin

    with pytest.raises(ValueError, match="no PEFT LoRA linear layer"):
        LoRANullPlugin().post_lora_load({"adapter": None}, torch.nn.Linear(2, 2))
