"""The method registry: a method declared in one place is a method everywhere (config, inject, the regulariser
driver, adapter files), and clashing declarations are refused."""
import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import methods
from loranull_kernels.methods.base import AdapterInit, Method, Regularizer, nonnegative_real, split_singular

from ..tiny_models import tiny_model, token_batches


def _initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit:
    """A toy base-rewriting initialiser: the adapter starts as W's top-r rows' SVD part (any factors will do)."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    A, B = split_singular(U[:, :r], S[:r], Vh[:r], scaling)
    return AdapterInit(lora_A=A, lora_B=B, weight=weight - scaling * (B @ A))


def _penalty(layer, config, module_name=""):
    return config.toy_weight * layer.lora_B.float().square().sum()


TOY = Method("toy", _initialize, rewrites_base=True, regularizer=Regularizer("toy_l2", _penalty),
             options=(nonnegative_real("toy_weight", 0.5),))


@pytest.fixture
def toy_method():
    methods.register(TOY)
    try:
        yield TOY
    finally:
        methods.unregister("toy")


def test_a_registered_method_works_through_the_whole_api(toy_method, tmp_path):
    cfg = lk.AdapterConfig(method="toy", r=4, toy_weight=2.0, target_modules=["q_proj"])
    assert cfg.effective_regularizer == "toy_l2" and cfg.toy_weight == 2.0
    with pytest.raises(ValueError, match="toy_weight must be a finite number ≥ 0"):
        lk.AdapterConfig(method="toy", toy_weight=-1.0)
    base = tiny_model("llama")
    model = lk.inject(tiny_model("llama"), cfg, penalty_hooks=False)
    batch = token_batches(1, seed=0)[0]
    with torch.no_grad():  # base-rewriting, output-preserving init: the model's output is unchanged
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, atol=1e-4, rtol=1e-4)
    layers = [m for m in model.modules() if isinstance(m, lk.LoRALinear)]
    expected = sum(2.0 * l.lora_B.float().square().sum() for l in layers)
    torch.testing.assert_close(lk.regularization_loss(model), expected)
    lk.save_adapter(model, tmp_path / "toy")
    again = lk.load_adapter(tiny_model("llama"), tmp_path / "toy")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)


def test_unregistering_removes_the_method_and_its_declarations(toy_method):
    methods.unregister("toy")
    try:
        assert "toy" not in methods.METHODS and "toy_weight" not in methods.OPTIONS
        assert "toy_l2" not in methods.REGULARIZERS
        with pytest.raises(TypeError, match="unknown field"):
            lk.AdapterConfig(toy_weight=1.0)
    finally:
        methods.register(TOY)  # the fixture unregisters it again


def test_clashing_declarations_are_refused_and_nothing_is_added():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(Method("lora", _initialize))
    clash = Method("clash", _initialize, options=(nonnegative_real("kasa_beta", 1.0),))
    with pytest.raises(ValueError, match="'kasa_beta'"):
        methods.register(clash)
    assert "clash" not in methods.METHODS and methods.OPTIONS["kasa_beta"].default == 1e-4
    shared = Method("shared_piece", _initialize, regularizer=methods.REGULARIZERS["kasa"])
    methods.register(shared)  # one piece object declared by two methods is fine
    try:
        assert lk.AdapterConfig(method="shared_piece").effective_regularizer == "kasa"
    finally:
        methods.unregister("shared_piece")
    assert "kasa" in methods.REGULARIZERS  # still KaSA's


def test_every_built_in_method_is_registered_with_its_fields():
    assert set(methods.METHODS) == {"lora", "pissa", "milora", "lora_null", "kasa", "roselora", "lalora"}
    assert set(methods.REGULARIZERS) == {"kasa", "lalora"} and set(methods.SPARSITY) == {"roselora"}
    cfg = lk.AdapterConfig()
    assert set(cfg.to_dict()) >= set(methods.OPTIONS)
    assert all(cfg.options[name] == opt.default for name, opt in methods.OPTIONS.items())
