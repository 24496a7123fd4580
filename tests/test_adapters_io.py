"""save_adapter / load_adapter / export_peft / to_plain_lora."""
import json

import pytest
import safetensors.torch
import torch

import loranull_kernels as lk
from loranull_kernels import adapter_files as adapters
from loranull_kernels import export_peft, load_adapter, save_adapter, to_plain_lora
from loranull_kernels.inject import inject
from loranull_kernels.nn import LoRALinear

from .helpers import assert_close
from .tiny_models import output, tiny_model, token_batches

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

METHODS = {
    "lora": dict(method="lora"),
    "pissa": dict(method="pissa"),
    "milora": dict(method="milora"),
    "lora_null": dict(method="lora_null"),
    "lora_null_v2": dict(method="lora_null", freeze_A=True, null_dim=8),
}


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def trained(kind="llama", variant="lora", dtype=torch.float32, seed=0, calib_seed=1, **kw):
    """A tiny model with adapters whose trainable tensors were moved away from their init (as training would)."""
    cfg = lk.AdapterConfig(r=4, alpha=8, **{**METHODS[variant], **kw})
    model = tiny_model(kind, dtype, seed=seed)
    inject(model, cfg, calibration_data=token_batches(2, seed=calib_seed) if cfg.needs_calibration else None,
           progress=False)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model, cfg


BATCH = token_batches(1, seed=9)[0]


def out(model):
    with torch.no_grad():
        return output(model, BATCH)


@pytest.mark.parametrize("variant", list(METHODS))
def test_save_then_load_gives_identical_outputs(tmp_path, variant):
    model, cfg = trained(variant=variant)
    expected = out(model)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / adapters.CONFIG_NAME).read_text())
    assert meta["format_version"] == adapters.FORMAT_VERSION and meta["config"] == cfg.to_dict()
    assert meta["package_version"] == lk.__version__ and len(meta["modules"]) == 14
    keys = safetensors.torch.load_file(tmp_path / "ad" / adapters.WEIGHTS_NAME).keys()
    assert ("model.layers.0.self_attn.q_proj.lora_A0" in keys) == (variant != "lora")
    # Onto the original model: the saved tensors replace any init (no calibration runs) and the residual base is
    # rebuilt bit for bit.
    fresh = load_adapter(tiny_model("llama"), tmp_path / "ad")
    assert torch.equal(out(fresh), expected)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad, name
    # Onto a model already injected with the same config (another init: other calibration data, other seed).
    other, _ = trained(variant=variant, calib_seed=2)
    load_adapter(other, tmp_path / "ad")
    assert_close(out(other), expected, torch.float32, "reloaded onto an injected model", tol=1e-5)


def test_bf16_roundtrip_and_trained_bias(tmp_path):
    model, _ = trained("qwen2", "milora", torch.bfloat16, train_bias=True)
    expected = out(model)
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(tiny_model("qwen2", torch.bfloat16), tmp_path / "ad")
    assert torch.equal(out(fresh), expected)
    q = fresh.model.layers[0].self_attn.q_proj
    assert q.bias.requires_grad and q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_load_shares_a_base_it_keeps_and_copies_one_it_rewrites(tmp_path, variant):
    """Loading keeps the replaced layers for a rollback until it returns: a base the file leaves as it is must be
    shared (no second copy of every weight), one it rewrites copied (the kept original stays untouched)."""
    model, _ = trained("qwen2", variant, train_bias=True)
    save_adapter(model, tmp_path / "ad")
    fresh = tiny_model("qwen2")
    q_before = fresh.model.layers[0].self_attn.q_proj
    weight, bias = q_before.weight.detach().clone(), q_before.bias.detach().clone()
    load_adapter(fresh, tmp_path / "ad")
    q = fresh.model.layers[0].self_attn.q_proj
    assert (q.weight is q_before.weight) == (variant == "lora")
    assert q.bias is not q_before.bias  # a trained bias from the file never reaches the replaced module
    assert torch.equal(q_before.weight, weight) and torch.equal(q_before.bias, bias)
    assert torch.equal(out(fresh), out(model))


def test_adapter_saved_in_float32_loads_onto_the_float64_model(tmp_path):
    model, _ = trained("llama", "lora_null")
    save_adapter(model, tmp_path / "ad")
    wide = load_adapter(tiny_model("llama", torch.float64), tmp_path / "ad")
    assert wide.model.layers[0].mlp.up_proj.lora_A.dtype == torch.float64
    assert_close(out(wide), out(model), torch.float32, "float64 reload", tol=1e-5)


def test_gpt2_conv1d_save_load_and_export(tmp_path):
    from peft import PeftModel

    model, _ = trained("gpt2", "pissa")
    expected = out(model)
    save_adapter(model, tmp_path / "ad")
    assert torch.equal(out(load_adapter(tiny_model("gpt2"), tmp_path / "ad")), expected)
    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "peft").eval()
    assert_close(out(peft_model), expected, torch.float32, "PEFT on GPT-2", tol=1e-5)


def test_crash_mid_save_never_leaves_a_loadable_half_adapter(tmp_path, monkeypatch):
    model, _ = trained()
    real_save = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half the file written, then the "disk" fails
            f.truncate(f.seek(0, 2) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "ad")
    assert list(tmp_path.iterdir()) == [], "no adapter and no temporary directory left behind"
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_model("llama"), tmp_path / "ad")
    # Over an existing adapter: a failed save keeps the previous one intact and loadable.
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    save_adapter(model, tmp_path / "ad")
    before = out(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert torch.equal(out(load_adapter(tiny_model("llama"), tmp_path / "ad")), before)


def test_mismatched_base_and_config_are_refused(tmp_path):
    model, _ = trained(variant="milora")
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="not the one the adapter was trained on"):
        load_adapter(tiny_model("llama", seed=1), tmp_path / "ad")
    with pytest.raises(ValueError, match="not the one the adapter was trained on"):
        load_adapter(trained(variant="milora", seed=1)[0], tmp_path / "ad")
    with pytest.raises(ValueError, match="no module"):
        load_adapter(tiny_model("bert"), tmp_path / "ad")
    with pytest.raises(ValueError, match="method 'lora'"):
        load_adapter(trained(variant="lora")[0], tmp_path / "ad")
    with pytest.raises(ValueError, match="other modules"):
        load_adapter(inject(tiny_model("llama"), lk.AdapterConfig(method="milora", r=4, alpha=8,
                                                                  target_modules=["q_proj"])), tmp_path / "ad")
    with pytest.raises(ValueError, match="r=8"):
        load_adapter(inject(tiny_model("llama"), lk.AdapterConfig(method="milora", r=8, alpha=16)), tmp_path / "ad")
    merged, _ = trained(variant="milora")
    merged.model.layers[1].mlp.up_proj.merge()
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter(merged, tmp_path / "ad")
    untouched = tiny_model("llama", seed=1)
    with pytest.raises(ValueError):
        load_adapter(untouched, tmp_path / "ad")
    assert not any(isinstance(m, LoRALinear) for m in untouched.modules()), "a refused load modifies nothing"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other files"):
        save_adapter(model, tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="not a loranull_kernels adapter"):
        load_adapter(tiny_model("llama"), tmp_path / "other")
    with pytest.raises(ValueError, match="no LoRALinear"):
        save_adapter(tiny_model("llama"), tmp_path / "none")


@pytest.mark.parametrize("variant,rslora", [("lora", False), ("milora", False), ("lora_null", False),
                                            ("lora_null", True)])
def test_export_peft_loads_to_the_same_outputs(tmp_path, variant, rslora):
    from peft import PeftModel

    model, cfg = trained("qwen2", variant, train_bias=variant == "lora", use_rslora=rslora)
    expected = out(model)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == (cfg.r if variant == "lora" else 2 * cfg.r), "base-rewriting methods export rank 2r"
    assert config["lora_alpha"] / config["r"] == pytest.approx(cfg.scaling, rel=1e-12) and not config["use_rslora"]
    assert config["bias"] == ("lora_only" if variant == "lora" else "none")
    peft_model = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path / "peft").eval()
    assert_close(out(peft_model), expected, torch.float32, f"PEFT vs {variant}", tol=1e-5)
    if variant == "milora":  # export reads only adapter tensors: a merged model exports the same adapter
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.merge()
        export_peft(model, tmp_path / "peft")
        again = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path / "peft").eval()
        assert_close(out(again), expected, torch.float32, "PEFT from a merged model", tol=1e-5)


def test_to_plain_lora_is_the_change_to_the_original_weight():
    lin = torch.nn.Linear(24, 20).double()
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear.from_linear(lin, r=3, alpha=5, method="milora", use_rslora=True)
    with torch.no_grad():
        layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64))
        layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    layer.rank_scale = torch.nn.Parameter(torch.rand(3, generator=g, dtype=torch.float64))
    layer.mask_A = torch.rand(layer.lora_A.shape, generator=g) > 0.3
    layer.mask_B = torch.rand(layer.lora_B.shape, generator=g) > 0.3
    A, B, s = to_plain_lora(layer)
    assert A.shape == (6, 24) and B.shape == (20, 6) and s == layer.scaling
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)
    assert_close(lin(x) + s * x @ A.t() @ B.t(), layer(x), torch.float64, "original + plain LoRA", tol=1e-12)
    plain = LoRALinear.from_linear(lin, r=3, method="lora")
    A, B, _ = to_plain_lora(plain)
    assert torch.equal(A, plain.lora_A.detach()) and torch.equal(B, plain.lora_B.detach())
