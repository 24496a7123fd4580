"""The method registry: a method declared in one place is a method everywhere (config, inject, the regulariser
driver, adapter files), and clashing declarations are refused."""
import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import methods
from loranull_kernels.methods.base import AdapterInit, Method, Option, Regularizer, nonnegative_real, split_singular

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


# ------------------------------------------------------------------------------- declarations that broke later
def toy(name="probe", **kw):
    from loranull_kernels.methods import lora

    return Method(name, lora.initialize, **kw)


@pytest.mark.parametrize("field", ["r", "alpha", "method", "options", "scaling", "to_dict", "effective_regularizer"])
def test_an_option_named_like_a_config_field_is_refused(field):
    """`r`, `alpha`, `method`, `options` broke every config built afterwards; `scaling` was stored but unreadable."""
    with pytest.raises(ValueError, match=f"option '{field}' is a name AdapterConfig uses itself"):
        methods.register(toy(options=(nonnegative_real(field, 1.0),)))
    assert "probe" not in methods.METHODS and field not in methods.OPTIONS
    assert lk.AdapterConfig(r=4).r == 4 and lk.AdapterConfig(alpha=3.0).scaling == 3.0 / 8


def test_option_defaults_that_break_configs_or_files_are_refused(tmp_path):
    anything = lambda v: True  # noqa: E731
    with pytest.raises(ValueError, match=r"default \(1, 2\) that does not come back from JSON"):
        methods.register(toy(options=(Option("probe_pair", (1, 2), anything, "a pair"),)))
    with pytest.raises(ValueError, match="default -1.0 its own check refuses"):
        methods.register(toy(options=(nonnegative_real("probe_weight", -1.0),)))
    with pytest.raises(ValueError, match="not an identifier"):
        methods.register(toy(options=(nonnegative_real("probe weight", 1.0),)))
    assert "probe" not in methods.METHODS
    methods.register(toy(options=(Option("probe_pair", [1, 2], anything, "a pair"),)))
    try:  # a value given to a permissive option is held to the same rule
        with pytest.raises(ValueError, match=r"AdapterConfig.probe_pair=\(3, 4\) does not come back from JSON"):
            lk.AdapterConfig(method="probe", probe_pair=(3, 4))
        model = lk.inject(tiny_model("llama"), lk.AdapterConfig(method="probe", r=2, target_modules=["q_proj"],
                                                                 probe_pair=[3, 4]))
        lk.save_adapter(model, tmp_path / "probe")
        assert lk.load_adapter(tiny_model("llama"), tmp_path / "probe") is not None
    finally:
        methods.unregister("probe")


@pytest.mark.parametrize("name", ["", "  padded ", 3, None])
def test_empty_or_non_string_method_names_are_refused(name):
    with pytest.raises(ValueError, match="non-empty string"):
        methods.register(toy(name))
    assert name not in methods.METHODS


def test_a_piece_named_auto_is_refused():
    with pytest.raises(ValueError, match="other than 'auto'"):
        methods.register(toy(regularizer=Regularizer("auto", _penalty)))


def test_register_and_unregister_errors_name_what_is_wrong():
    with pytest.raises(TypeError, match="register needs a Method .*got str 'probe'"):
        methods.register("probe")
    with pytest.raises(ValueError, match=r"no method named 'nothing' is registered; registered: \["):
        methods.unregister("nothing")
    with pytest.raises(ValueError, match="'kasa' is a built-in method: it cannot be unregistered"):
        methods.unregister("kasa")
    assert "kasa" in methods.METHODS and "kasa" in methods.REGULARIZERS


def test_unregistering_a_method_a_live_model_uses_breaks_only_that_model(toy_method):
    """Every optimiser's step() used to raise (the global penalty hook read the registry for every model)."""
    model = lk.inject(tiny_model("llama"), lk.AdapterConfig(method="toy", r=2, target_modules=["q_proj"]))
    methods.unregister("toy")
    try:
        other = torch.nn.Linear(3, 3)
        other(torch.ones(1, 3)).sum().backward()
        torch.optim.SGD(other.parameters(), lr=0.1).step()  # another model's optimiser: unaffected
        model(**token_batches(1)[0]).logits.sum().backward()
        with pytest.raises(ValueError, match="was made with method 'toy', which is no longer registered"):
            torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    finally:
        methods.register(TOY)  # the fixture unregisters it again
        lk.regularize.disable_penalty_hooks(model)


def test_an_initialiser_that_rewrites_the_base_must_say_so(tmp_path):
    """Undeclared, the changed weight was saved as the original's fingerprint: the file never loaded back."""
    methods.register(Method("undeclared", _initialize))
    try:
        with pytest.raises(ValueError, match="changed the base weight, but the method does not declare rewrites_base"):
            lk.inject(tiny_model("llama"), lk.AdapterConfig(method="undeclared", r=2, target_modules=["q_proj"]))
    finally:
        methods.unregister("undeclared")


def test_an_initialiser_returning_a_wrong_shape_is_named():
    def transposed(weight, r, scaling, config, covariance=None, generator=None):
        init = _initialize(weight, r, scaling, config)
        return AdapterInit(lora_A=init.lora_A.t(), lora_B=init.lora_B, weight=init.weight)

    methods.register(Method("wrong_shape", transposed, rewrites_base=True))
    try:
        model = tiny_model("llama")
        with pytest.raises(ValueError, match=r"method 'wrong_shape': the initialiser returned lora_A of shape "
                                             r"\(64, 2\), expected \(2, 64\)"):
            lk.inject(model, lk.AdapterConfig(method="wrong_shape", r=2, target_modules=["q_proj"]))
        assert not [m for m in model.modules() if isinstance(m, lk.LoRALinear)]
    finally:
        methods.unregister("wrong_shape")


def test_loading_a_file_of_a_method_that_is_not_registered_names_the_method(toy_method, tmp_path):
    model = lk.inject(tiny_model("llama"), lk.AdapterConfig(method="toy", r=2, target_modules=["q_proj"]),
                      penalty_hooks=False)
    lk.save_adapter(model, tmp_path / "toy")
    methods.unregister("toy")
    try:
        with pytest.raises(ValueError, match="saved with method 'toy', which is not registered here .*register it"):
            lk.load_adapter(tiny_model("llama"), tmp_path / "toy")
    finally:
        methods.register(TOY)
