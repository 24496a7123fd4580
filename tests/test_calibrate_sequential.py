"""Block-sequential calibration: block-stack discovery, equality with one pass (statistics and adapters) on every
tiny model, per-block arguments, offload, progress per block, the memory check, clear errors; models whose forward
is not a plain chain of blocks (refused by "sequential", one pass under "auto"); generators; ignored options."""
import copy
import warnings

import pytest
import torch
from torch import nn

import loranull_kernels as lk
from loranull_kernels import calibration_memory
from loranull_kernels.blocks import find_block_stack
from loranull_kernels.calibrate import calibrate
from loranull_kernels.calibrate_sequential import split_targets
from loranull_kernels.inject import inject
from loranull_kernels.nn import LoRALinear
from loranull_kernels.targets import find_targets

from .helpers import assert_close
from .tiny_models import output, tiny_model, token_batches

ALL_KINDS = ("llama", "qwen2", "mistral", "gpt2", "bert")
STACKS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gpt2": "transformer.h",
          "bert": "encoder.layer"}


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def padded_batches():
    data = token_batches(2, seed=1)
    data[1]["attention_mask"][0, 7:] = 0  # padding must be masked block by block too
    return data


def adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_block_stack_is_found_generically(kind):
    model = tiny_model(kind)
    names = [n for n, _ in find_targets(model, "all-linear")]
    name, blocks = find_block_stack(model, names)
    assert name == STACKS[kind] and len(blocks) == 2
    assert find_block_stack(model, ["nothing.in.a.block"]) is None


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_lora_null_adapters_equal_one_pass(kind):
    """Same covariances (to float32 rounding) ⇒ same adapters, including layers outside the stack (BERT's pooler,
    whose null space is degenerate: it sees one vector per sample, so it is calibrated before any block changes)."""
    cfg = lk.AdapterConfig(method="lora_null", r=4, alpha=8, null_dim=6)
    data = padded_batches()
    one = inject(tiny_model(kind), cfg, calibration_data=data, progress=False, calibration_mode="one_pass")
    seq = inject(tiny_model(kind), cfg, calibration_data=data, progress=False, calibration_mode="sequential",
                 offload="cpu")
    A, B = adapters(one), adapters(seq)
    assert set(A) == set(B) and A
    for name in A:
        for p in ("weight", "lora_A", "lora_B"):
            assert_close(getattr(B[name], p), getattr(A[name], p), torch.float32, f"{name}.{p}", tol=1e-5)
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(one) == trainable(seq), "earlier blocks' adapters stay trainable"
    x = token_batches(1, seed=9)[0]
    assert_close(output(seq, x), output(tiny_model(kind), x), torch.float32, "output at init", tol=1e-5)
    assert all(not m._forward_pre_hooks for m in seq.modules()), "hooks removed"


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, *, scale):
        return torch.tanh(self.fc(x)) * scale


class PerLayerArgs(nn.Module):
    """Blocks that get different keyword arguments (like per-layer attention masks) and one outside target."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList(Scaled() for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.embed(ids)
        for i, block in enumerate(self.blocks):
            h = block(h, scale=float(i + 1))
        return self.head(h)


def test_per_block_arguments_and_targets_outside_the_stack():
    torch.manual_seed(0)
    model = PerLayerArgs()
    data = [torch.randint(0, 20, (2, 5)) for _ in range(3)]
    one = calibrate(model, data, target_modules=["fc", "head"], progress=False)
    seq = calibrate(model, data, target_modules=["fc", "head"], progress=False, calibration_mode="sequential")
    assert set(one) == set(seq) == {"blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head"}
    for name in one:
        assert_close(seq[name], one[name], torch.float32, name, tol=1e-6)


def test_progress_says_which_solver_each_block_used(capsys):
    cfg = lk.AdapterConfig(method="lora_null", r=4)
    inject(tiny_model("llama"), cfg, calibration_data=token_batches(1), progress=True)  # auto: sequential
    err = capsys.readouterr().err
    assert "block 1/2" in err and "block 2/2" in err and "null space: eigh ×" in err


def test_memory_check_refuses_before_touching_the_model(monkeypatch):
    model = tiny_model("llama")
    cfg = lk.AdapterConfig(method="lora_null", r=4)
    monkeypatch.setattr(calibration_memory, "free_bytes", lambda device: 1000)
    with pytest.raises(calibration_memory.CalibrationMemoryError, match=r"calibration_mode='sequential'"):
        inject(model, cfg, calibration_data=token_batches(1), progress=False, calibration_mode="one_pass")
    with pytest.raises(MemoryError, match=r"GiB .*free"):
        inject(model, cfg, calibration_data=token_batches(1), progress=False)
    assert not adapters(model) and all(p.requires_grad for p in model.parameters())


def test_one_block_needs_less_than_the_whole_model():
    model = tiny_model("llama")
    targets = find_targets(model, "all-linear")
    per_block, outside = split_targets(find_block_stack(model, [n for n, _ in targets]), targets)
    whole = calibration_memory.covariance_bytes(targets)[torch.device("cpu")]
    block = calibration_memory.covariance_bytes(per_block[0])[torch.device("cpu")]
    # Siblings with one input size count once: q/k/v/o (64) and gate/up (64, mlp), down (96). o_proj really has an
    # input of its own: the estimate is a lower bound, so that a refusal is never a false alarm. Plus the solver's
    # two float64 matrices of the largest size.
    assert block == 4 * (2 * 64 * 64 + 96 * 96) + 16 * 96 * 96
    assert whole == 4 * 2 * (2 * 64 * 64 + 96 * 96) + 16 * 96 * 96 and outside == []


def test_clear_errors():
    cfg = lk.AdapterConfig(method="lora_null", r=2)
    with pytest.raises(ValueError, match="calibration_mode"):
        inject(tiny_model("llama"), cfg, calibration_data=token_batches(1), calibration_mode="blockwise")
    with pytest.raises(ValueError, match="offload"):
        inject(tiny_model("llama"), cfg, calibration_data=token_batches(1), offload="disk")
    flat = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    with pytest.raises(ValueError, match="block stack"):
        calibrate(flat, [torch.randn(3, 6)], progress=False, calibration_mode="sequential")
    covs = calibrate(flat, [torch.randn(3, 6)], progress=False, calibration_mode="auto")  # auto: one pass
    assert set(covs) == {"0", "2"}


def test_train_mode_is_restored_on_adapters_created_block_by_block():
    model = tiny_model("llama").train()
    inject(model, lk.AdapterConfig(method="lora_null", r=4), calibration_data=token_batches(1), progress=False,
           calibration_mode="sequential")
    assert all(m.training for m in model.modules()), "the adapters were created while the model ran in eval mode"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class NotAChainModel(nn.Module):
    """A block stack the model does not run as a plain chain: ``how`` says what it does instead."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x):
        h = self.embed(x)
        if self.how == "reversed":
            for block in reversed(self.blocks):
                h = block(h)
            return h
        for _ in range(2 if self.how == "looped" else 1):  # looped: a weight-shared stack run twice (ALBERT)
            for block in self.blocks:
                if self.how == "transformed":
                    h = 0.5 * (h + block(h))
                elif self.how == "in_place":  # changed after the block returned, before the next one runs
                    h = block(h)
                    h.mul_(0.5)
                else:
                    h = block(h)
        return h


@pytest.mark.parametrize("how", ["transformed", "looped", "reversed", "in_place"])
def test_a_stack_that_is_not_a_chain_is_calibrated_in_one_pass(how):
    """Blocks run alone see other inputs than inside such a model: "sequential" refuses it, "auto" (inject's
    default) warns and calibrates in one pass, so the statistics are the model's."""
    torch.manual_seed(0)
    model = NotAChainModel(how)
    data = [torch.randn(2, 5, 4) for _ in range(3)]
    targets = ["fc1", "fc2"]
    one = calibrate(model, data, targets, progress=False)
    with pytest.warns(UserWarning, match="calibrating in one pass"):
        auto = calibrate(model, data, targets, progress=False, calibration_mode="auto")
    assert set(auto) == set(one)
    for name in one:
        assert_close(auto[name], one[name], torch.float32, name, tol=1e-6)
    with pytest.raises(ValueError, match="calibration_mode='sequential' cannot be used"):
        calibrate(model, data, targets, progress=False, calibration_mode="sequential")
    cfg = lk.AdapterConfig(method="lora_null", r=2, target_modules=targets)
    reference = inject(copy.deepcopy(model), cfg, calibration_data=data, progress=False, calibration_mode="one_pass")
    with pytest.warns(UserWarning, match="calibrating in one pass"):
        got = inject(copy.deepcopy(model), cfg, calibration_data=data, progress=False)  # inject's "auto"
    assert adapters(reference).keys() == adapters(got).keys()
    for name, layer in adapters(reference).items():
        assert_close(adapters(got)[name].lora_A, layer.lora_A, torch.float32, name, tol=1e-5)


def test_a_plain_chain_calibrates_block_by_block_without_a_warning():
    torch.manual_seed(0)
    model = NotAChainModel("plain")
    data = [torch.randn(2, 5, 4) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq = calibrate(model, data, ["fc1", "fc2"], progress=False, calibration_mode="sequential")
    one = calibrate(model, data, ["fc1", "fc2"], progress=False)
    for name in one:
        assert_close(seq[name], one[name], torch.float32, name, tol=1e-6)


def test_a_generator_is_read_once_when_blocks_need_the_data_twice():
    """BERT all-linear calibrates its pooler (outside the stack) in a pass of its own, then the blocks: a generator
    used to be empty by then ("calibration data is empty")."""
    cfg = lk.AdapterConfig(method="lora_null", r=2)
    data = padded_batches()
    listed = inject(tiny_model("bert"), cfg, calibration_data=data, progress=False)
    generated = inject(tiny_model("bert"), cfg, calibration_data=(b for b in data), progress=False)
    A, B = adapters(listed), adapters(generated)
    assert set(A) == set(B) and "pooler.dense" in A
    for name in A:
        assert_close(B[name].lora_A, A[name].lora_A, torch.float32, name, tol=1e-6)


def test_options_that_cannot_apply_are_not_silently_ignored():
    data = token_batches(1)
    with pytest.warns(UserWarning, match="offload='cpu' is ignored"):
        calibrate(tiny_model("llama"), data, progress=False, offload="cpu")  # one pass
    with pytest.warns(UserWarning, match="offload='cpu' is ignored"):
        inject(tiny_model("llama"), lk.AdapterConfig(method="lora_null", r=2), calibration_data=data,
               progress=False, calibration_mode="one_pass", offload="cpu")
    with pytest.warns(UserWarning, match="calibration_mode, offload, max_batches are ignored: method 'lora'"):
        inject(tiny_model("llama"), lk.AdapterConfig(r=2), calibration_mode="sequential", offload="cpu",
               max_batches=3)
    for bad, match in (({"normalise": True}, r"unknown keyword argument\(s\) \['normalise'\]"),
                       ({"normalize": True}, "normalize_calibration"),
                       ({"calibration_data": data[0]}, "single dict"),
                       ({"calibration_data": data[0]["input_ids"]}, "single Tensor"),
                       ({"calibration_data": 3}, r"iterable of batches .*got int")):
        model = tiny_model("llama")
        with pytest.raises(TypeError, match=match):
            inject(model, lk.AdapterConfig(method="lora_null", r=2), progress=False, **bad)
        assert not adapters(model) and all(p.requires_grad for p in model.parameters())
