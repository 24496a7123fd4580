"""LLaMA-Factory: a tiny LoRA SFT run from a YAML config file, launched as ``llamafactory-cli train`` would be but
through ``python -m loranull_kernels.integrations.llamafactory``; every PEFT LoRA layer runs the fused op."""
import importlib.machinery
import sys
import types

import pytest
import yaml

from tests.integrations.conftest import require
from tests.integrations.tool_fixtures import BLOCKS, LINEARS_PER_BLOCK, save_tiny_llama, write_alpaca

STEPS = 2


@pytest.fixture
def llamafactory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the tests must reach no model hub
    # LLaMA-Factory 0.9.5 imports torchaudio at import time (for its multimodal plugins) and PyPI's torchaudio is a
    # CUDA build that breaks next to CPU torch; text-only training never calls it, so a stub stands in for it here.
    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401
        except ImportError:
            stub = types.ModuleType("torchaudio")
            stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)  # transformers calls find_spec on it
            monkeypatch.setitem(sys.modules, "torchaudio", stub)
    return require("llamafactory")


def _config(tmp_path) -> dict:
    data = tmp_path / "data"
    data.mkdir()
    write_alpaca(data / "tiny.json")
    (data / "dataset_info.json").write_text('{"tiny": {"file_name": "tiny.json"}}')
    return dict(model_name_or_path=str(save_tiny_llama(tmp_path / "model")), stage="sft", do_train=True,
                finetuning_type="lora", lora_target="all", lora_rank=4, lora_alpha=8, dataset="tiny",
                dataset_dir=str(data), template="default", cutoff_len=64, overwrite_cache=True,
                output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to="none", bf16=False, fp16=False,
                dataloader_num_workers=0, preprocessing_num_workers=None, use_cpu=True)


@pytest.mark.slow
def test_yaml_run_trains_on_the_fused_op(llamafactory, tmp_path, fused_calls, monkeypatch):
    from loranull_kernels.integrations import llamafactory as lklf

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path)))
    monkeypatch.setattr(sys, "argv", ["llamafactory"])
    assert lklf.main(["train", str(config)]) == 0
    # every LoRA layer, in every forward of every step (the backward reuses the op's saved state: no extra call)
    assert len(fused_calls) >= STEPS * BLOCKS * LINEARS_PER_BLOCK
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_callback_refuses_a_model_without_lora_layers(llamafactory):
    import torch

    from loranull_kernels.integrations.llamafactory import PatchCallback

    with pytest.raises(ValueError, match="no PEFT LoRA linear layer"):
        PatchCallback().on_train_begin(None, None, None, model=torch.nn.Linear(2, 2))
