"""Config fields with wrong types, the merge state and RoseLoRA state in ``state_dict``, and calibration batches that
overflow float32: each is refused by name or round-trips, never a silent wrong answer."""
import math

import pytest
import torch
from torch import nn

import loranull_kernels as lk
from loranull_kernels._denormals import flush_denormals
from loranull_kernels.covariance_accumulator import CovarianceAccumulator, NonFiniteCalibrationError
from loranull_kernels.nn import LoRALinear
from loranull_kernels.targets import find_targets

from .tiny_models import output, tiny_model, token_batches


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


# ------------------------------------------------------------------------------------------------------- config
BAD_FIELDS = [
    ("exclude_modules", "q_proj", "did you mean"),  # iterated by character: excluded nothing
    ("exclude_modules", [3], "exclude_modules"),
    ("freeze_A", "no", "freeze_A must be a bool"),  # "no" is truthy: froze A
    ("use_rslora", "yes", "use_rslora must be a bool"),
    ("train_bias", 1, "train_bias must be a bool"),
    ("normalize_calibration", None, "normalize_calibration must be a bool"),
    ("init_seed", "x", "init_seed"),  # was: RuntimeError from manual_seed
    ("init_seed", 2**70, "init_seed"),  # was: overflow
    ("init_seed", 1.0, "init_seed"),
    ("pissa_oversample", "a", "pissa_oversample"),  # was: '<' not supported
    ("pissa_n_iter", 2.5, "pissa_n_iter"),
    ("target_modules", "q_proj[", "target_modules.*does not compile"),  # was: raw re.error at inject
    ("target_modules", "", "target_modules"),
    ("dropout", True, "dropout"),
    ("dropout", math.nan, "dropout"),
    ("null_dim", True, "null_dim"),
    ("r", 4.0, "AdapterConfig.r"),
    ("alpha", "8", "alpha"),
    ("method", ["lora"], "method"),
]


@pytest.mark.parametrize("field,value,match", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_config_fields_of_the_wrong_type_are_refused_by_name(field, value, match):
    with pytest.raises((TypeError, ValueError), match=match):
        lk.AdapterConfig(**{field: value})


def test_config_valid_values_are_still_accepted():
    cfg = lk.AdapterConfig(init_seed=2**64 - 1, exclude_modules=["v_proj"], target_modules=r".*\.q_proj",
                           dropout=0, alpha=3)
    assert lk.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    lk.AdapterConfig(init_seed=-(2**63), exclude_modules=("v_proj",), target_modules=("q_proj",))


def test_from_dict_refuses_a_non_dict():
    with pytest.raises(ValueError, match="dict"):
        lk.AdapterConfig.from_dict([("r", 4)])


def test_find_targets_refuses_a_string_exclude_and_a_broken_regex():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="did you mean"):
        find_targets(model, ["q_proj", "v_proj"], "q_proj")
    with pytest.raises(ValueError, match="does not compile"):
        find_targets(model, "q_proj[")
    names = [n for n, _ in find_targets(model, ["q_proj", "v_proj"], ["q_proj"])]
    assert names and all(n.endswith("v_proj") for n in names)


def test_null_dim_above_in_features_names_the_field_and_the_layer():
    """Was: 'k must be an int in [1, 64]', naming neither."""
    lin = nn.Linear(16, 24)
    cfg = lk.AdapterConfig(method="lora_null", r=4, null_dim=20)
    with pytest.raises(ValueError, match=r"null_dim=20 exceeds in_features=16"):
        LoRALinear.from_linear(lin, config=cfg, covariance=torch.eye(16))


def test_layer_constructor_refuses_wrong_types():
    with pytest.raises(TypeError, match="r must be an int"):
        LoRALinear(8, 8, r=2.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(8, 8, r=2, dropout=1.0)


# ---------------------------------------------------------------------------------------------------- merge state
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_state_dict_loads_merged_into_a_fresh_layer(dtype):
    """A merged layer's state_dict loaded into a fresh layer applied the adapter twice (max difference 1.54)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, dtype=dtype)
    layer = LoRALinear.from_linear(lin, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        merged_out = layer(x)
    fresh = LoRALinear.from_linear(nn.Linear(16, 12, dtype=dtype), r=4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    with torch.no_grad():
        assert torch.equal(fresh(x), merged_out)
        tol = 1e-5 if dtype == torch.float32 else 0.1
        assert (fresh(x).float() - expected.float()).abs().max().item() < tol
    fresh.unmerge()
    layer.unmerge()
    # and back: an unmerged state loads into a merged layer as unmerged
    merged_again = LoRALinear.from_linear(nn.Linear(16, 12, dtype=dtype), r=4)
    merged_again.merge()
    merged_again.load_state_dict(layer.state_dict())
    assert not merged_again.merged
    with torch.no_grad():
        assert torch.equal(merged_again(x), layer(x))


def test_state_dict_without_merge_state_still_loads():
    """A state_dict written before the merge state was recorded loads strictly, as unmerged."""
    layer = LoRALinear.from_linear(nn.Linear(16, 12), r=4)
    old = {k: v for k, v in layer.state_dict().items() if k != "lora_merged"}
    fresh = LoRALinear.from_linear(nn.Linear(16, 12), r=4)
    fresh.load_state_dict(old)
    assert not fresh.merged


# ------------------------------------------------------------------------------------------------- RoseLoRA state
def test_roselora_trained_state_dict_loads_strictly_into_a_fresh_model():
    """After after_optimizer_step the state_dict gained mask_*/rose_* keys; a strict load into a freshly injected
    model failed."""
    cfg = lk.AdapterConfig(method="roselora", r=4, rose_t_init=0, rose_t_final=2, rose_keep=0.5,
                           target_modules=["q_proj", "up_proj"])
    model = tiny_model("llama")
    lk.inject(model, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = token_batches(1, seed=4)[0]
    with flush_denormals():
        for step in range(3):
            output(model, batch).float().pow(2).mean().backward()
            opt.step()
            lk.after_optimizer_step(model, step)
            opt.zero_grad()
    state = model.state_dict()
    assert any(k.endswith("mask_A") for k in state) and any(k.endswith("rose_imp_A") for k in state)
    fresh = tiny_model("llama")
    lk.inject(fresh, cfg)
    fresh.load_state_dict(state)  # strict
    q = fresh.model.layers[0].self_attn.q_proj
    assert q.mask_A is not None and q.mask_A.dtype == torch.bool and int(q.rose_updates) == 3
    with torch.no_grad():
        assert torch.equal(output(fresh, batch), output(model, batch))
    # a fresh state loads strictly into a fresh model too (the importance state exists from the start)
    other = tiny_model("llama")
    lk.inject(other, cfg)
    other.load_state_dict(tiny_model_state(cfg))


def tiny_model_state(cfg):
    model = tiny_model("llama")
    lk.inject(model, cfg)
    return model.state_dict()


def test_wrongly_shaped_mask_in_a_state_dict_is_reported():
    layer = LoRALinear.from_linear(nn.Linear(16, 12), r=4)
    state = dict(layer.state_dict())
    state["mask_A"] = torch.ones(4, 15, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="mask_A"):
        LoRALinear.from_linear(nn.Linear(16, 12), r=4).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("normalize", [False, True])
def test_batch_overflowing_float32_is_refused_and_state_unchanged(normalize):
    """``randn(4, 8) * 1e20`` is finite but its xᵀx is not: it made C Inf for good."""
    acc = CovarianceAccumulator(8, name="q_proj", normalize=normalize)
    acc.update(torch.randn(4, 8))
    C, tokens, samples = acc.C.clone(), acc.tokens, acc.samples
    big = torch.randn(4, 8) * 1e20
    if normalize:  # normalised samples never overflow: the batch is accepted
        acc.update(big)
        assert torch.isfinite(acc.C).all()
        return
    with pytest.raises(NonFiniteCalibrationError, match="q_proj.*too large"):
        acc.update(big)
    assert torch.equal(acc.C, C) and (acc.tokens, acc.samples) == (tokens, samples)
    # near the limit but not over it: accepted and finite; a masked huge token does not count
    acc.update(torch.full((2, 8), 1e18))
    x, mask = torch.randn(2, 8), torch.tensor([True, False])
    x[1] = 1e30
    acc.update(x, mask)
    x[1] = math.inf  # a masked Inf: the per-token path, then the exact overflow check over kept tokens
    acc.update(x, mask)
    assert torch.isfinite(acc.C).all() and acc.tokens == tokens + 4
    with pytest.raises(NonFiniteCalibrationError, match="too large"):  # masked Inf beside a kept huge token
        x[0] = 1e20
        acc.update(x, mask)
    assert acc.tokens == tokens + 4


def test_all_reduce_failing_half_way_leaves_the_local_statistic(monkeypatch):
    """C was reduced in place before the counts: a failure between the two collectives left a global C with
    local counts (and a retry would add C twice)."""
    import torch.distributed as dist

    acc = CovarianceAccumulator(6, name="v_proj")
    acc.update(torch.randn(5, 6))
    C, counts = acc.C.clone(), (acc.tokens, acc.samples)
    calls = []

    def flaky(t, op=None, group=None):
        calls.append(t)
        if len(calls) == 2:
            raise RuntimeError("connection reset")
        t.mul_(2)  # another rank's identical contribution

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", flaky)
    with pytest.raises(RuntimeError, match="connection reset"):
        acc.all_reduce()
    assert torch.equal(acc.C, C) and (acc.tokens, acc.samples) == counts
    calls.clear()
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: t.mul_(2))
    acc.all_reduce()
    assert torch.equal(acc.C, 2 * C) and (acc.tokens, acc.samples) == (2 * counts[0], 2 * counts[1])
