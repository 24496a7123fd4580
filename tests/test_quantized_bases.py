"""Adapters on a quantized base (QLoRA): a tiny Llama saved from a config and reloaded by transformers with a
``BitsAndBytesConfig`` (NF4 with and without double quantization, FP4, int8), and torchao's int8 weights.

Promises tested: the base stays quantized (no dense copy in the model or in adapter files); every method runs; the
output-preserving ones leave the quantized model's logits unchanged at init; calibration never trips bitsandbytes'
CPU repacking (tested with the repacking on and off, on any CPU); save / load / export_peft / merge work; a refused
configuration changes nothing.
"""
import copy
import warnings

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels.base_weights import base_weight
from loranull_kernels.nn import QuantizedLoRALinear

from .quantized_models import (QUANTS, float_model, is_packed, logits, quantized_model, reference_logits, relative,
                               repack_for_cpu, set_repacking, torchao_model)
from .tiny_models import token_batches

pytest.importorskip("bitsandbytes")

BATCHES = token_batches(3, batch=2, seq=10)
CALIB = token_batches(4, batch=2, seq=10, seed=1)
# Methods whose output is unchanged at init on a dense base, and the configs that make them so on a quantized one.
PRESERVING = {
    "lora": {},
    "lora_null-basis": dict(method="lora_null", lora_null_init="basis"),
    "lora_null": dict(method="lora_null"),
    "lora_null-v2": dict(method="lora_null", freeze_A=True),
    "pissa": dict(method="pissa"),
    "milora": dict(method="milora"),
    "roselora": dict(method="roselora"),
    "lalora": dict(method="lalora"),
}


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):  # the interpreter runs the Triton kernels in their own tests
        yield


def config(r=4, **kw):
    kw.setdefault("init_seed", 0)
    return lk.AdapterConfig(r=r, **kw)


def inject(model, cfg, **kw):
    return lk.inject(model, cfg, calibration_data=CALIB if cfg.needs_calibration else None, progress=False, **kw)


@torch.no_grad()
def pretend_trained(model):
    """Move every trainable tensor a little, as training would (so a wrong load shows in the logits)."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn_like(p))


def dense_shapes(model):
    """(out, in) of every targeted projection."""
    return {tuple(base_weight(m).dense().shape) for _, m in model.named_modules()
            if base_weight(m) is not None and base_weight(m).quantized_format is not None}


@pytest.mark.parametrize("quant", QUANTS)
def test_inject_keeps_the_base_quantized(quant):
    model = quantized_model(quant)
    shapes = dense_shapes(model)
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    inject(model, config(method="lora_null"))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLoRALinear)]
    assert len(layers) == 14
    for t in list(model.parameters()) + list(model.buffers()):
        assert not (t.is_floating_point() and tuple(t.shape) in shapes), "a dense copy of a base weight"
    adapters = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    adapters += sum(b.numel() * b.element_size() for m in layers for b in (m.lora_A0, m.lora_B0))
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert after <= before + adapters + 4096  # + the merge flags
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


@pytest.mark.parametrize("quant", ["nf4-nested", "int8"])
@pytest.mark.parametrize("method", list(PRESERVING))
def test_output_unchanged_at_init(quant, method):
    model = quantized_model(quant)
    ref = [reference_logits(model, b) for b in BATCHES]
    inject(model, config(**PRESERVING[method]))
    for b, r in zip(BATCHES, ref):
        assert relative(logits(model, b), r) <= 1e-4


@pytest.mark.parametrize("quant", ["nf4-nested", "fp4", "int8"])
def test_requantize_mode_reports_the_residuals_rounding(quant):
    """quantized_rewrite="requantize" stores Q(W − s·B0A0) (PiSSA's QLoRA recipe): the output moves at init by
    that rounding, which each layer reports, and the forward is exactly the re-quantized residual plus s·B0A0."""
    model = quantized_model(quant)
    ref = reference_logits(model, BATCHES[0])
    inject(model, config(method="lora_null", quantized_rewrite="requantize"))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLoRALinear)]
    changes = [m.init_report["weight_change"] for m in layers]
    assert all(0 < c < 0.3 for c in changes) and all(0 < m.init_report["residual_error"] < 0.3 for m in layers)
    assert relative(logits(model, BATCHES[0]), ref) > 1e-3
    layer = layers[0]
    x = torch.randn(3, layer.in_features)
    W_eff = layer.base.dense().float() + layer.scaling * layer.lora_B0 @ layer.lora_A0
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ W_eff.t(), atol=1e-4)


def test_kasa_and_every_method_train_on_nf4():
    for method in ("kasa", "lora", "lora_null", "roselora", "lalora", "pissa", "milora"):
        model = quantized_model("nf4-nested")
        packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
        inject(model, config(method=method, r=4))
        if method == "lalora":
            lk.estimate_curvature(model, [dict(b, labels=b["input_ids"]) for b in CALIB])
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        batch = BATCHES[0]
        losses = []
        for step in range(6):
            loss = model(**batch, labels=batch["input_ids"]).loss
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
            lk.after_optimizer_step(model, step)
        assert losses[-1] < losses[0], (method, losses)
        now = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if p.dtype == torch.uint8}
        assert now.keys() == packed.keys() and all(torch.equal(now[n], packed[n]) for n in packed), method


@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
@pytest.mark.parametrize("repacking", [True, False], ids=["repacking-on", "repacking-off"])
def test_calibration_never_trips_the_cpu_repacking(mode, repacking):
    """On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit weight at its first eval-mode no-grad forward, and
    its dequantization then silently returns another matrix. Calibration runs exactly such forwards: inject must
    switch the repacking off first. Forcing it on tests that path on any CPU."""
    model = quantized_model("nf4-nested", repacking=repacking)
    reference_model = quantized_model("nf4-nested")
    ref = logits(reference_model, BATCHES[0])
    inject(model, config(method="lora_null"), calibration_mode=mode)
    inject(reference_model, config(method="lora_null"), calibration_mode=mode)
    assert not is_packed(model)
    assert relative(logits(model, BATCHES[0]), ref) <= 1e-4
    for (n, a), (_, b) in zip(model.named_buffers(), reference_model.named_buffers()):
        if n.endswith("lora_A0"):
            assert torch.allclose(a, b, atol=1e-5), n


def test_lk_calibrate_switches_repacking_off():
    model = quantized_model("nf4", repacking=True)
    lk.calibrate(model, CALIB, progress=False)
    assert not is_packed(model)


def test_a_base_repacked_before_inject_is_read_back():
    model = quantized_model("nf4")
    dense = {n: base_weight(m).dense() for n, m in model.named_modules() if base_weight(m) is not None
             and base_weight(m).quantized_format}
    repack_for_cpu(model.model.layers[0].self_attn.q_proj)
    with pytest.warns(UserWarning, match="repacked"):
        inject(model, config())
    got = model.model.layers[0].self_attn.q_proj.base.dense()
    want = dense["model.layers.0.self_attn.q_proj"]
    assert relative(got, want) < 2 ** -7  # the scales' bf16 rounding, not another matrix (it was 1.48 relative)


@pytest.mark.parametrize("quant", ["nf4-nested", "int8"])
@pytest.mark.parametrize("rewrite", ["low_rank", "requantize"])
def test_save_and_load_onto_a_freshly_loaded_quantized_model(tmp_path, quant, rewrite):
    model = quantized_model(quant)
    inject(model, config(method="lora_null", quantized_rewrite=rewrite))
    pretend_trained(model)
    want = logits(model, BATCHES[0])
    lk.save_adapter(model, tmp_path / "a")
    files = list((tmp_path / "a").iterdir())
    assert sum(f.stat().st_size for f in files) < 200_000  # adapter-sized: no base inside
    fresh = quantized_model(quant)
    lk.load_adapter(fresh, tmp_path / "a")
    assert relative(logits(fresh, BATCHES[0]), want) <= 1e-6
    if rewrite == "requantize":  # the residual is rebuilt and re-quantized bit for bit
        a, b = model.model.layers[1].mlp.down_proj, fresh.model.layers[1].mlp.down_proj
        assert torch.equal(a.weight.data, b.weight.data)
    # and back into the adapted model it came from (a Trainer resume)
    lk.load_adapter(model, tmp_path / "a")
    assert relative(logits(model, BATCHES[0]), want) <= 1e-6


def test_fingerprint_is_not_moved_or_rounded_with_the_model(tmp_path):
    """model.half() / .cuda() apply to buffers: the fingerprint of W taken at build time must not follow (a float16
    fingerprint made the file unloadable, a CUDA one broke the save)."""
    model = quantized_model("nf4")
    inject(model, config())
    model._apply(lambda t: t.half() if t.dtype == torch.float64 else t)  # what .half() does to a float64 buffer
    layers = [m for m in model.modules() if isinstance(m, QuantizedLoRALinear)]
    assert layers and all(m.original_fingerprint.dtype == torch.float64 for m in layers)
    lk.save_adapter(model, tmp_path / "a")
    lk.load_adapter(quantized_model("nf4"), tmp_path / "a")


def test_load_into_layers_of_the_other_rewrite_mode_is_refused(tmp_path):
    """The two quantized_rewrite modes differ by the residual's rounding (29% of the logits on SmolLM2): an adapter
    saved under one is not loaded into layers built under the other, and the layers stay as they were."""
    saved = quantized_model("nf4")
    inject(saved, config(method="lora_null", quantized_rewrite="requantize"))
    lk.save_adapter(saved, tmp_path / "a")
    model = quantized_model("nf4")
    inject(model, config(method="lora_null", quantized_rewrite="low_rank"))
    before = {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}
    with pytest.raises(ValueError, match="quantized_rewrite='low_rank', the file with 'requantize'"):
        lk.load_adapter(model, tmp_path / "a")
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items() if n in before)


def test_load_refuses_another_quantized_base(tmp_path):
    model = quantized_model("nf4")
    inject(model, config())
    lk.save_adapter(model, tmp_path / "a")
    other = quantized_model("nf4", seed=1)
    state = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="not the one the adapter was trained on"):
        lk.load_adapter(other, tmp_path / "a")
    assert all(torch.equal(p, state[n]) for n, p in other.named_parameters())


def test_dense_adapter_loads_onto_the_quantized_model_only_if_the_weights_match(tmp_path):
    """The fingerprint is of the weight itself: an adapter trained on the float model is refused by its NF4
    rounding (another matrix to 1e-1), and one trained on the NF4 model loads onto it."""
    dense = float_model()
    inject(dense, config())
    lk.save_adapter(dense, tmp_path / "dense")
    with pytest.raises(ValueError, match="fingerprint"):
        lk.load_adapter(quantized_model("nf4"), tmp_path / "dense")


def test_export_peft_loads_onto_the_same_quantized_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = quantized_model("nf4-nested")
    inject(model, config(method="lora_null"))
    pretend_trained(model)
    want = logits(model, BATCHES[0])
    lk.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(quantized_model("nf4-nested"), tmp_path / "peft").eval()
    assert relative(logits(loaded, BATCHES[0]), want) <= 1e-4


@pytest.mark.parametrize("quant", ["nf4-nested", "int8"])
def test_merge_requantizes_and_says_by_how_much(quant):
    model = quantized_model(quant)
    inject(model, config())
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        want = layer(x)
    with pytest.warns(UserWarning, match="re-quantized the weight"):
        layer.merge()
    assert layer.merged and isinstance(base_weight(layer.base_layer).quantized_format, str)
    with torch.no_grad():
        merged = layer(x)
    assert relative(merged, want) < 0.2  # one 4-bit / 8-bit rounding of the merged weight
    with pytest.warns(UserWarning, match="re-quantized the weight"):
        layer.unmerge()
    assert not layer.merged
    assert layer.base_rewritten  # unmerge re-quantized again: the base is no longer exactly the loaded W


def test_torchao_base():
    model = torchao_model()
    ref = logits(model, BATCHES[0])
    inject(model, config(method="lora_null", lora_null_init="basis"))
    assert relative(logits(model, BATCHES[0]), ref) <= 1e-4
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLoRALinear) and layer.base.quantized_format == "subclass"
    batch = BATCHES[0]
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="does not record"):
        layer.merge()


def test_rewriting_method_on_torchao_refused_before_anything_changes():
    model = torchao_model()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match="does not record the configuration"):
        inject(model, config(method="pissa", quantized_rewrite="requantize"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(modules[n] is m for n, m in model.named_modules())
    inject(model, config(method="pissa"))  # the low-rank correction needs no re-quantization
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLoRALinear)


def test_to_plain_lora_and_state_dict_of_a_quantized_layer():
    model = quantized_model("nf4")
    inject(model, config(method="pissa"))
    layer = model.model.layers[0].self_attn.v_proj
    A, B, s = lk.to_plain_lora(layer)
    assert A.shape == (8, layer.in_features) and B.shape == (layer.out_features, 8)
    W = layer.original_weight()
    assert torch.allclose(W + s * B @ A, layer.base.dense().float(), atol=1e-5)  # at init: no change
    keys = set(layer.state_dict())
    assert {"lora_A", "lora_B", "lora_A0", "lora_B0", "base_layer.weight"} <= keys
    clone = copy.deepcopy(layer)
    x = torch.randn(2, layer.in_features)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(clone(x), layer(x))


def test_half_precision_input_returns_the_input_dtype():
    model = quantized_model("nf4")
    inject(model, config())
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16  # computed in bitsandbytes' compute dtype (float32), returned as given
    set_repacking(model, False)


def test_sparse_edit_refuses_a_quantized_base(tmp_path):
    from loranull_kernels.export import apply_sparse_delta, export_sparse_delta

    dense = float_model()
    inject(dense, config(method="roselora"))
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, lk.LoRALinear):
                m.lora_B.normal_()
    export_sparse_delta(dense, tmp_path / "edit.safetensors")
    model = torchao_model()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="quantized"):
        apply_sparse_delta(model, tmp_path / "edit.safetensors")
    assert all(torch.equal(p.dequantize() if hasattr(p, "dequantize") else p, state[n].dequantize()
                           if hasattr(state[n], "dequantize") else state[n]) for n, p in model.named_parameters())
