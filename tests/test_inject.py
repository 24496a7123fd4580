"""lk.inject on tiny Hugging Face models: targets, output unchanged at init, trainable set, LoRA-Null's leak,
training, and clear errors."""
import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.inject import inject, print_trainable_parameters
from loranull_kernels.nn import LoRALinear
from loranull_kernels.nullspace import leak

from .helpers import assert_close
from .tiny_models import KINDS, capture_inputs, output, tiny_model, token_batches

# name -> AdapterConfig fields (every method of this issue, and LoRA-Null's variants)
VARIANTS = {
    "lora": dict(method="lora"),
    "pissa": dict(method="pissa"),
    "milora": dict(method="milora"),
    "lora_null_v1": dict(method="lora_null"),
    "lora_null_v2": dict(method="lora_null", freeze_A=True),
    "lora_null_null_dim": dict(method="lora_null", null_dim=12),
    "lora_null_basis": dict(method="lora_null", lora_null_init="basis"),
}
# Tolerance on the output at init, relative to max(1, |output|): rounding of the rewritten base in the model dtype.
INIT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):  # the Triton interpreter would make model-level tests slow
        yield


def config(variant, r=4, **kw):
    return lk.AdapterConfig(r=r, alpha=2 * r, **{**VARIANTS[variant], **kw})


def calib(cfg):
    return token_batches(2, seed=1) if cfg.needs_calibration else None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_unchanged_at_init(variant, kind, dtype):
    model = tiny_model(kind, dtype)
    batch = token_batches(1, seed=7)[0]
    with torch.no_grad():
        expected = output(model, batch)
        cfg = config(variant)
        inject(model, cfg, calibration_data=calib(cfg), progress=False)
        assert sum(isinstance(m, LoRALinear) for m in model.modules()) == (13 if kind == "bert" else 14)
        got = output(model, batch)
    assert got.dtype == dtype
    assert_close(got, expected, dtype, f"{variant} on {kind}", tol=INIT_TOL[dtype])


def test_only_adapter_parameters_train_and_dtype_device_kept(capsys):
    model = tiny_model("qwen2", torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    inject(model, lk.AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"], train_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "q_proj.bias", "v_proj.bias")) for n in trainable)
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"lora_A", "lora_B", "bias"}
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32 and q.weight.device.type == "cpu"
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    counts = print_trainable_parameters(model)
    assert counts.total == total + n_adapter
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(counts.percent - 100 * counts.trainable / counts.total) < 1e-9
    assert f"trainable params: {counts.trainable:,}" in capsys.readouterr().out


def test_v2_trains_B_only_and_never_keeps_x():
    model = tiny_model("llama")
    cfg = config("lora_null_v2")
    inject(model, cfg, calibration_data=calib(cfg), progress=False)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_B"}
    model.train()
    output(model, token_batches(1, seed=3)[0]).square().mean().backward()
    for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
        assert layer.lora_A.grad is None and layer.lora_B.grad is not None

    # At the layer: the forward saves no tensor aliasing x when A is frozen (v1, by contrast, keeps it for dA).
    def saved_aliases_of_x(layer):
        x = torch.randn(3, 5, layer.in_features, requires_grad=True)
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            y = layer(x)
        y.sum().backward()
        return [t for t in packed if t.data_ptr() == x.data_ptr()]

    v2 = model.model.layers[0].self_attn.q_proj
    assert saved_aliases_of_x(v2) == []
    v1 = LoRALinear.from_linear(torch.nn.Linear(64, 32), r=4)
    assert len(saved_aliases_of_x(v1)) >= 1


def test_lora_null_leak_small_on_held_out_knowledge_like_inputs():
    # Knowledge-like data: sequences over a restricted 8-token vocabulary, so every layer's inputs live (nearly) in
    # a low-dimensional subspace and the null space is meaningful. Held out: fresh sequences from the same tokens.
    vocab = [3, 11, 17, 29, 41, 53, 67, 80]
    r = 8
    leaks = {}
    for method in ("lora_null", "lora"):
        model = tiny_model("llama")
        inject(model, lk.AdapterConfig(method=method, r=r, init_seed=0),
               calibration_data=token_batches(6, batch=4, seq=16, vocab=vocab, seed=1) if method == "lora_null" else None,
               progress=False)
        records, remove = capture_inputs(model, LoRALinear)
        with torch.no_grad():
            for b in token_batches(3, batch=4, seq=16, vocab=vocab, seed=99):
                model(**b)
        remove()
        leaks[method] = {n: leak(torch.cat(xs), model.get_submodule(n).lora_A) for n, xs in records.items()}
    for name, value in leaks["lora_null"].items():
        in_f = model.get_submodule(name).in_features
        # Deeper layers (after attention mixing and the MLP's nonlinearity) see more directions than 8 tokens span,
        # so their leak is not exactly 0; it stays an order of magnitude below a random adapter's.
        assert value < 0.1 * r / in_f, f"{name}: LoRA-Null leak {value:.2e} is not small (r/in = {r / in_f:.3f})"
        plain = leaks["lora"][name]
        assert 0.25 * r / in_f < plain < 4 * r / in_f, f"{name}: plain LoRA leak {plain:.3f} vs r/in {r / in_f:.3f}"
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(leaks["lora_null"]) < 0.03 * mean(leaks["lora"])
    first = "model.layers.0.self_attn.q_proj"  # inputs: normalised embeddings of 8 tokens, exactly rank 8 < 64 - r
    assert leaks["lora_null"][first] < 1e-8


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_few_adamw_steps_reduce_the_loss(variant):
    model = tiny_model("llama")
    cfg = config(variant, r=4)
    inject(model, cfg, calibration_data=calib(cfg), progress=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = token_batches(1, batch=4, seq=12, seed=5)[0]
    losses = []
    for _ in range(6):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, f"{variant}: losses {losses}"


def test_target_matching_rules():
    names = lambda m: {n for n, x in m.named_modules() if isinstance(x, LoRALinear)}  # noqa: E731
    m = inject(tiny_model("llama"), lk.AdapterConfig(target_modules="all-linear", exclude_modules=["down_proj"]))
    assert "lm_head" not in names(m) and not any(n.endswith("down_proj") for n in names(m)) and len(names(m)) == 12
    m = inject(tiny_model("llama"), lk.AdapterConfig(target_modules=["q_proj", "mlp.up_proj"]))
    assert names(m) == {f"model.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn.q_proj", "mlp.up_proj")}
    m = inject(tiny_model("llama"), lk.AdapterConfig(target_modules=r"model\.layers\.1\.self_attn\.(k|v)_proj"))
    assert names(m) == {"model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"}
    # Tied output head: excluded by "all-linear" because it shares the embedding's weight.
    tied = tiny_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    assert "lm_head" not in names(inject(tied, lk.AdapterConfig()))
    # Classification head of an encoder: excluded; the pooler is not an output head and is adapted.
    bert = names(inject(tiny_model("bert_cls"), lk.AdapterConfig()))
    assert "classifier" not in bert and "bert.pooler.dense" in bert and len(bert) == 13


def test_gpt2_conv1d_is_adapted_with_output_unchanged():
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2")
    batch = token_batches(1, seed=2)[0]
    with torch.no_grad():
        expected = output(model, batch)
        inject(model, lk.AdapterConfig(method="milora", r=4, alpha=8))
        got = output(model, batch)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, LoRALinear) and c_attn.fan_in_fan_out and (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert_close(got, expected, torch.float32, "gpt2 output", tol=1e-4)


def test_init_seed_reproducible_and_different_per_layer():
    a = inject(tiny_model("llama"), lk.AdapterConfig(r=4, init_seed=3, target_modules=["q_proj"]))
    b = inject(tiny_model("llama"), lk.AdapterConfig(r=4, init_seed=3, target_modules=["q_proj"]))
    qa0, qa1 = (a.model.layers[i].self_attn.q_proj.lora_A for i in (0, 1))
    assert torch.equal(qa0, b.model.layers[0].self_attn.q_proj.lora_A) and not torch.equal(qa0, qa1)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown"):
        lk.AdapterConfig(method="dora")
    with pytest.raises(ValueError, match=r"r=40 exceeds .* 32 of layer 'model\.layers\.0\.self_attn\.k_proj'"):
        inject(tiny_model("llama"), lk.AdapterConfig(r=40, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"no module matched .*q_proj"):
        inject(tiny_model("llama"), lk.AdapterConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="no module matched"):
        inject(tiny_model("llama"), lk.AdapterConfig(target_modules="q_proj"))  # a regex must match full names
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.self_attn' of type LlamaAttention"):
        inject(tiny_model("llama"), lk.AdapterConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match="calibration_data"):
        inject(tiny_model("llama"), lk.AdapterConfig(method="lora_null"))
    model = inject(tiny_model("llama"), lk.AdapterConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has adapters"):
        inject(model, lk.AdapterConfig(target_modules=["k_proj"]))
    with pytest.raises(TypeError, match="out_proj"):
        inject(torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2)), lk.AdapterConfig(r=2, target_modules=["out_proj"]))
    with pytest.raises(TypeError, match="AdapterConfig"):
        inject(tiny_model("llama"), {"method": "lora"})


def test_null_dim_above_a_layers_in_features_is_refused_before_calibration_naming_the_layer():
    model = tiny_model("llama")
    before = {n: type(m) for n, m in model.named_modules()}
    widest = max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = lk.AdapterConfig(method="lora_null", r=4, null_dim=widest + 1, target_modules=["q_proj", "down_proj"])
    calls = []

    class Batches:  # calibration data that records whether anyone read it
        def __iter__(self):
            calls.append(1)
            return iter(token_batches(1))

    with pytest.raises(ValueError, match=r"null_dim=\d+ exceeds in_features=\d+ of layer '.*(q_proj|down_proj)'"):
        inject(model, cfg, calibration_data=Batches())
    assert not calls  # refused before calibration
    assert {n: type(m) for n, m in model.named_modules()} == before  # and before any layer was replaced


def test_offloaded_weights_are_refused_naming_the_layer_before_anything_changes():
    """accelerate's offload keeps weights on the meta device until the module's forward: an adapter cannot be
    built from them, and the error says so instead of 'Cannot copy out of meta tensor' halfway through."""
    accelerate = pytest.importorskip("accelerate")
    model = accelerate.cpu_offload(tiny_model("llama"), execution_device="cpu")
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    with pytest.raises(ValueError, match=r"inject: the weight of 'model\.layers\.0\.self_attn\.q_proj'.*meta device"):
        inject(model, lk.AdapterConfig(target_modules=["q_proj"]))
    assert not any(isinstance(m, lk.LoRALinear) for m in model.modules())


def test_zero3_partitioned_weights_are_refused_with_the_way_out(tmp_path):
    """A weight partitioned by DeepSpeed ZeRO-3 is a (0,) shard marked ``ds_id``: inject and load_adapter refuse it
    before anything changes, naming the layer and the way out (tests/integrations/test_deepspeed.py runs the real
    thing in DeepSpeed's venv)."""
    saved = inject(tiny_model("llama"), lk.AdapterConfig(target_modules=["q_proj"]))
    lk.save_adapter(saved, tmp_path / "a")
    model = tiny_model("llama")
    q = model.model.layers[1].self_attn.q_proj
    q.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    q.weight.ds_id = 7
    for run, what in ((lambda: inject(model, lk.AdapterConfig(target_modules=["q_proj"])), "inject"),
                      (lambda: lk.load_adapter(model, tmp_path / "a"), "load_adapter")):
        with pytest.raises(ValueError, match=rf"{what}: the weight of 'model\.layers\.1\.self_attn\.q_proj' is "
                                             r"partitioned by DeepSpeed ZeRO-3.*before creating the ZeRO-3"):
            run()
        assert not any(isinstance(m, lk.LoRALinear) for m in model.modules())
