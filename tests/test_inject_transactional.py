"""inject is transactional: whatever fails, wherever (target discovery, calibration in one pass or block by block,
an initialiser in a later block, a KeyboardInterrupt inside a block, the penalty hooks), the model comes back as it
was: its own modules, every parameter's requires_grad and values, every module's train/eval mode, no hooks left,
penalty hooks as before; and the same model can be injected again."""
import warnings

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import methods, regularize
from loranull_kernels.covariance_accumulator import NonFiniteCalibrationError
from loranull_kernels.methods import lora_null
from loranull_kernels.methods.base import Method

from .helpers import assert_close
from .tiny_models import output, tiny_model, token_batches

LORA_NULL = lk.AdapterConfig(method="lora_null", r=4)


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def prepared_model():
    """A tiny Llama in a state inject must give back exactly: some parameters already frozen, mixed modes."""
    model = tiny_model("llama").train()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[1].mlp.eval()
    return model


def snapshot(model) -> dict:
    return {"modules": {n: m for n, m in model.named_modules()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "training": {n: m.training for n, m in model.named_modules()},
            "state": {n: t.detach().clone() for n, t in model.state_dict().items()},
            "hooks": lk.regularize.penalty_hooks_enabled(model)}


def assert_as_before(model, before: dict) -> None:
    now = {n: m for n, m in model.named_modules()}
    assert now.keys() == before["modules"].keys(), "the same module tree"
    assert all(now[n] is m for n, m in before["modules"].items()), "the very same module objects"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]
    assert {n: m.training for n, m in model.named_modules()} == before["training"]
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for n, t in before["state"].items():
        assert state[n].dtype == t.dtype and torch.equal(state[n].isnan(), t.isnan()) and torch.equal(
            state[n].nan_to_num(), t.nan_to_num()), f"{n} changed"
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules()), "hooks left behind"
    assert lk.regularize.penalty_hooks_enabled(model) == before["hooks"]
    assert model.config.use_cache is True


def assert_injects_again(model, cfg, data=None):
    """The restored model takes the adapters a fresh copy would get."""
    expected = lk.inject(prepared_model(), cfg, calibration_data=data, progress=False)
    lk.inject(model, cfg, calibration_data=data, progress=False)
    batch = token_batches(1, seed=4)[0]
    with torch.no_grad():
        assert_close(output(model.eval(), batch), output(expected.eval(), batch), torch.float32, "retry", tol=1e-5)


class FailOnCall:
    """An initialiser that raises ``error`` on its n-th call (a later block), the real one otherwise."""

    def __init__(self, n: int, error: BaseException, real=lora_null.initialize):
        self.n, self.error, self.real, self.calls = n, error, real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise self.error
        return self.real(*args, **kwargs)


@pytest.fixture
def failing_method():
    """Register a calibrated method whose initialiser fails on a chosen call; yields a function making its config."""
    names = []

    def make(n: int, error: BaseException) -> lk.AdapterConfig:
        name = f"fails_at_{len(names)}"
        methods.register(Method(name, FailOnCall(n, error), needs_calibration=True, rewrites_base=True,
                                solve_calibration=lora_null.solve_calibration))
        names.append(name)
        return lk.AdapterConfig(method=name, r=4)

    yield make
    for name in names:
        methods.unregister(name)


def test_target_discovery_and_option_errors_touch_nothing():
    model = prepared_model()
    before = snapshot(model)
    for cfg, kw in ((lk.AdapterConfig(target_modules=["nothing_like_this"]), {}),
                    (LORA_NULL, {}),  # no calibration data
                    (LORA_NULL, {"calibration_data": token_batches(1), "calibration_mode": "blockwise"})):
        with pytest.raises(ValueError):
            lk.inject(model, cfg, progress=False, **kw)
        assert_as_before(model, before)


@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
def test_non_finite_activations_first_in_block_1(mode):
    """Block 1's inputs turn NaN: block by block, block 0 was adapted (and everything frozen) before that showed."""
    model = prepared_model()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    before = snapshot(model)
    with pytest.raises(NonFiniteCalibrationError, match=r"model\.layers\.1\."):
        lk.inject(model, LORA_NULL, calibration_data=token_batches(2), progress=False, calibration_mode=mode)
    assert_as_before(model, before)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.copy_(prepared_model().model.layers[1].input_layernorm.weight)
    assert_injects_again(model, LORA_NULL, token_batches(2))


@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
def test_an_initialiser_failing_in_a_later_block(failing_method, mode):
    cfg = failing_method(9, RuntimeError("the initialiser failed"))  # 7 layers per block: block 1's 2nd layer
    model = prepared_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="the initialiser failed"):
        lk.inject(model, cfg, calibration_data=token_batches(2), progress=False, calibration_mode=mode)
    assert_as_before(model, before)
    assert_injects_again(model, LORA_NULL, token_batches(2))


@pytest.mark.parametrize("layer", [0, 1])
def test_a_non_finite_weight_of_an_uncalibrated_method(layer):
    """An Inf weight gave MiLoRA NaN factors without an error; now the layer is named, and a failure on the first
    layer no longer leaves every parameter frozen (as after a base kind the initialiser cannot read)."""
    model = prepared_model()
    with torch.no_grad():
        model.model.layers[layer].self_attn.v_proj.weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"'model\.layers\.{layer}\.self_attn\.v_proj' has NaN or Inf weights"):
        lk.inject(model, lk.AdapterConfig(method="milora", r=4), progress=False)
    assert_as_before(model, before)


@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
def test_a_keyboard_interrupt_inside_a_block(mode):
    """Ctrl-C while block 1 runs (calibration), or while an initialiser of block 1 runs."""
    model = prepared_model()
    before = snapshot(model)
    runs = []

    def interrupt(module, args):
        runs.append(1)
        if len(runs) == 2:  # sequential: block 0 is adapted by then; one pass: the second batch
            raise KeyboardInterrupt

    handle = model.model.layers[1].mlp.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        lk.inject(model, LORA_NULL, calibration_data=token_batches(2), progress=False, calibration_mode=mode)
    handle.remove()
    assert_as_before(model, before)
    assert_injects_again(model, LORA_NULL, token_batches(2))


def test_a_keyboard_interrupt_in_an_initialiser_of_block_1(failing_method):
    cfg = failing_method(10, KeyboardInterrupt())
    model = prepared_model()
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        lk.inject(model, cfg, calibration_data=token_batches(2), progress=False, calibration_mode="sequential")
    assert_as_before(model, before)


def test_a_failure_after_the_penalty_hooks_were_enabled(monkeypatch):
    real = regularize.enable_penalty_hooks

    def enable_then_interrupt(model):
        real(model)
        raise KeyboardInterrupt

    monkeypatch.setattr(regularize, "enable_penalty_hooks", enable_then_interrupt)
    model = prepared_model()
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        lk.inject(model, lk.AdapterConfig(method="kasa", r=4), progress=False)
    assert_as_before(model, before)
    assert not lk.regularize.penalty_hooks_enabled(model)


@pytest.mark.parametrize("transactional", [True, False])
def test_replaced_layers_live_until_inject_returns_only_when_transactional(transactional):
    """The rollback keeps block 0's replaced layers while block 1 calibrates; transactional=False frees them at
    once (flat memory in the number of blocks). Either way none outlives inject."""
    import gc
    import weakref

    model = tiny_model("llama")
    block0 = [weakref.ref(m) for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    seen = []

    def while_block_1_runs(module, args):
        gc.collect()
        seen.append(sum(r() is not None for r in block0))

    handle = model.model.layers[1].input_layernorm.register_forward_pre_hook(while_block_1_runs)
    lk.inject(model, LORA_NULL, calibration_data=token_batches(2), progress=False, calibration_mode="sequential",
              transactional=transactional)
    handle.remove()
    gc.collect()
    assert seen and seen[-1] == (len(block0) if transactional else 0)
    assert all(r() is None for r in block0), "a replaced layer outlived inject"


def test_not_transactional_leaves_earlier_blocks_adapted_as_documented():
    model = prepared_model()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(NonFiniteCalibrationError):
        lk.inject(model, LORA_NULL, calibration_data=token_batches(2), progress=False, calibration_mode="sequential",
                  transactional=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, lk.LoRALinear)
    with pytest.raises(TypeError, match="transactional must be a bool or 'auto'"):
        lk.inject(tiny_model("llama"), LORA_NULL, calibration_data=token_batches(1), transactional="yes")
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="penalty_hooks must be a bool, got 'no'"):  # it was read as True
        lk.inject(model, lk.AdapterConfig(method="kasa", r=2), penalty_hooks="no")
    assert not lk.regularize.penalty_hooks_enabled(model)


def test_a_kept_base_is_shared_so_the_rollback_costs_nothing():
    """LoRA keeps W: the adapter holds the nn.Linear's own Parameters (no copy), so keeping the replaced module for
    a rollback adds no memory; a method that rewrites W copies it, and that is what rollback_bytes counts."""
    from loranull_kernels.inject import rollback_bytes
    from loranull_kernels.targets import find_targets

    model = tiny_model("llama")
    original = model.model.layers[0].self_attn.q_proj
    targets = find_targets(model, "all-linear")
    assert rollback_bytes(targets, lk.AdapterConfig(method="lora", r=4)) == {}
    weights = sum(m.weight.numel() * m.weight.element_size() for _, m in targets)
    assert rollback_bytes(targets, LORA_NULL) == {torch.device("cpu"): weights}
    lk.inject(model, lk.AdapterConfig(method="lora", r=4))
    assert model.model.layers[0].self_attn.q_proj.weight is original.weight


def test_auto_gives_up_the_rollback_with_a_warning_when_it_would_not_fit(monkeypatch):
    import sys

    inject_module = sys.modules["loranull_kernels.inject"]  # (lk.inject is the function)
    real = inject_module.rollback_bytes
    # what LoRA-Null would keep, as if it were 2**50 times larger: more than half of any machine's free memory
    monkeypatch.setattr(inject_module, "rollback_bytes",
                        lambda targets, config: {d: b * 2**50 for d, b in real(targets, config).items()})
    model = prepared_model()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.warns(UserWarning, match="not transactional here"), pytest.raises(NonFiniteCalibrationError):
        lk.inject(model, LORA_NULL, calibration_data=token_batches(2), progress=False, calibration_mode="sequential")
    assert isinstance(model.model.layers[0].self_attn.q_proj, lk.LoRALinear)  # as documented for False
    model = prepared_model()  # LoRA shares its bases: nothing to keep, so it stays transactional without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.inject(model, lk.AdapterConfig(method="lora", r=4))
