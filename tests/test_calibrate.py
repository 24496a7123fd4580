"""lk.calibrate: per-layer input covariances over a model and a data set."""
import importlib

import pytest
import torch

import loranull_kernels as lk
import loranull_kernels.covariance_accumulator as covariance_module
from loranull_kernels.calibrate import calibrate
from loranull_kernels.covariance_accumulator import CovarianceAccumulator, NonFiniteCalibrationError
from loranull_kernels.inject import inject

from .helpers import assert_close, free_port, spawn_and_join
from .tiny_models import capture_inputs, tiny_model, token_batches

one_pass_module = importlib.import_module("loranull_kernels.calibrate_one_pass")  # where the accumulators are made

LLAMA_SHARED = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


@pytest.fixture(params=["one_pass", "sequential"])
def mode(request):
    """Both calibration modes: block by block must give the one-pass statistics (tests/test_calibrate_sequential.py
    has the rest of the sequential tests)."""
    return request.param


def recorded_inputs(model, module_type, data):
    """The inputs of every ``module_type`` layer over ``data``, from plain forward passes (recorded apart from
    calibration: the sequential mode runs some layers more than once)."""
    records, remove = capture_inputs(model, module_type)
    with torch.no_grad():
        for batch in data:
            model(**batch)
    remove()
    return records


def reference(records, masks=None, normalize=False):
    """Σ x̃ᵀx̃ / n_tokens in float64 from captured inputs (one tensor per batch), padding removed by ``masks``."""
    out = {}
    for name, xs in records.items():
        C, n = 0, 0
        for i, x in enumerate(xs):
            x = x.double()
            keep = torch.ones(x.shape[:-1], dtype=torch.bool) if masks is None else masks[i]
            if normalize:  # per sample (row of the batch): divide by |max over its kept tokens and features|
                peak = torch.stack([x[b][keep[b]].max() for b in range(x.shape[0])]).abs()
                x = x / peak[:, None, None]
            kept = x[keep]
            C, n = C + kept.t() @ kept, n + kept.shape[0]
        out[name] = C / n
    return out


def test_matches_float64_reference_with_one_accumulator_per_shared_input(monkeypatch, mode):
    created, updates = [], []

    class Counting(CovarianceAccumulator):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            created.append(self.name)

    real_update = covariance_module.covariance_update
    monkeypatch.setattr(one_pass_module, "CovarianceAccumulator", Counting)
    monkeypatch.setattr(covariance_module, "covariance_update", lambda *a: updates.append(1) or real_update(*a))
    model = tiny_model("llama")
    data = token_batches(3, seed=1)
    records = recorded_inputs(model, torch.nn.Linear, data)
    covs = calibrate(model, data, progress=False, calibration_mode=mode)
    assert len(created) == 8 and len(updates) == 8 * 3, "q/k/v and gate/up are accumulated once per layer"
    assert set(covs) == {f"model.layers.{i}.{n}" for i in (0, 1) for group in LLAMA_SHARED for n in group}
    for i in (0, 1):
        for group in LLAMA_SHARED:
            first = covs[f"model.layers.{i}.{group[0]}"]
            assert all(covs[f"model.layers.{i}.{n}"] is first for n in group[1:])
    ref = reference({n: xs for n, xs in records.items() if n in covs})
    for name, C in covs.items():
        assert C.dtype == torch.float32 and C.shape == ref[name].shape
        assert_close(C, ref[name], torch.float32, name, tol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_padding_is_masked_through_the_attention_mask(kind, mode):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(4)
    lengths = [12, 7, 4]
    seqs = [torch.randint(1, 96, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(seqs), 12, dtype=torch.long)
    mask = torch.zeros(len(seqs), 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    padded = calibrate(model, [{"input_ids": ids, "attention_mask": mask}], progress=False, calibration_mode=mode)
    alone = calibrate(model, [{"input_ids": s[None]} for s in seqs], progress=False)
    assert set(padded) == set(alone)
    for name in padded:
        assert_close(padded[name], alone[name], torch.float32, name, tol=1e-5)
    unmasked = calibrate(model, [{"input_ids": ids}], progress=False)
    name = next(iter(padded))
    assert (unmasked[name] - alone[name]).abs().max() > 1e-3, "without the mask the padding would count"


def test_normalize_option_divides_each_sample_by_its_abs_max(mode):
    model = tiny_model("llama")
    data = token_batches(2, batch=3, seq=8, seed=2)
    data[1]["attention_mask"][0, 5:] = 0  # the max is taken over kept tokens only
    records = recorded_inputs(model, torch.nn.Linear, data)
    covs = calibrate(model, data, target_modules=["q_proj", "down_proj"], normalize=True, progress=False,
                     calibration_mode=mode)
    ref = reference({n: records[n] for n in covs}, masks=[b["attention_mask"].bool() for b in data], normalize=True)
    plain = calibrate(model, data, target_modules=["q_proj", "down_proj"], progress=False)
    for name in covs:
        assert_close(covs[name], ref[name], torch.float32, name, tol=1e-5)
        assert not torch.allclose(covs[name], plain[name], rtol=1e-2)


def test_batch_types_max_batches_and_adapted_models():
    model = tiny_model("llama")
    ids = [b["input_ids"] for b in token_batches(3, seed=3, mask=False)]
    as_dicts = calibrate(model, [{"input_ids": x} for x in ids], target_modules=["v_proj"], progress=False)
    as_tensors = calibrate(model, ids, target_modules=["v_proj"], progress=True)
    as_tuples = calibrate(model, [(x,) for x in ids], target_modules=["v_proj"], progress=False)
    first_only = calibrate(model, ids, target_modules=["v_proj"], progress=False, max_batches=1)
    ref_first = calibrate(model, ids[:1], target_modules=["v_proj"], progress=False)
    for name, C in as_dicts.items():
        assert torch.equal(C, as_tensors[name]) and torch.equal(C, as_tuples[name])
        assert torch.equal(first_only[name], ref_first[name]) and not torch.equal(first_only[name], C)
    adapted = inject(tiny_model("llama"), lk.AdapterConfig(method="milora", r=4, target_modules=["v_proj"]))
    after = calibrate(adapted, ids, target_modules=["v_proj"], progress=False)  # LoRALinear layers are hooked too
    for name, C in as_dicts.items():
        assert_close(after[name], C, torch.float32, name, tol=1e-5)
    with pytest.raises(TypeError, match="tuple/list"):
        calibrate(model, ["not a batch"], progress=False)


def test_hooks_run_the_triton_covariance_kernel_when_selected(monkeypatch):
    if lk.backend.triton_unusable_reason(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("Triton (or its interpreter) is not usable here")
    kernel = importlib.import_module("loranull_kernels.ops.covariance.triton_backend")
    launches = []
    real_launch = kernel.covariance_update
    monkeypatch.setattr(kernel, "covariance_update", lambda *a: launches.append(1) or real_launch(*a))
    model = tiny_model("llama")
    data = token_batches(1, seed=1)
    data[0]["attention_mask"][1, 8:] = 0  # the kernel's token mask path
    with lk.backend.use("triton"):
        fused = calibrate(model, data, target_modules=["q_proj", "down_proj"], progress=False)
    assert len(launches) == 4, "one kernel launch per accumulator and batch"
    plain = calibrate(model, data, target_modules=["q_proj", "down_proj"], progress=False)
    for name, C in plain.items():
        assert_close(fused[name], C, torch.float32, name, tol=1e-5)


def test_gpt2_conv1d_inputs_are_calibrated(mode):
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2")
    data = token_batches(2, seed=6)
    records = recorded_inputs(model, Conv1D, data)
    covs = calibrate(model, data, progress=False, calibration_mode=mode)
    assert set(covs) == set(records) and "lm_head" not in covs
    ref = reference(records)
    for name, C in covs.items():
        assert_close(C, ref[name], torch.float32, name, tol=1e-5)


def test_eval_mode_and_no_grad_during_calibration_then_restored(mode):
    model = tiny_model("llama").train()
    model.model.layers[1].eval()  # a mixed state must come back as it was
    seen = []
    q = model.model.layers[0].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda m, a: seen.append((model.training, m.training, torch.is_grad_enabled())))
    calibrate(model, token_batches(1), progress=False, calibration_mode=mode)
    handle.remove()
    assert seen and all(s == (False, False, False) for s in seen)  # sequential mode runs q twice
    assert model.training and q.training and not model.model.layers[1].training
    assert all(not m._forward_pre_hooks for m in model.modules()), "calibration hooks removed"


def test_errors_empty_data_non_finite_activations_no_target(mode):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], progress=False, calibration_mode=mode)
    only_padding = token_batches(1)
    only_padding[0]["attention_mask"].zero_()
    with pytest.raises(ValueError, match="empty calibration set"):
        calibrate(model, only_padding, progress=False, calibration_mode=mode)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("inf")
    bad = {"input_ids": torch.full((1, 6), 5), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    model.train()
    with pytest.raises(NonFiniteCalibrationError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        calibrate(model, [bad], progress=False, calibration_mode=mode)
    assert all(not m._forward_pre_hooks for m in model.modules()), "hooks removed after an error"
    assert model.training, "mode restored after an error"
    with pytest.raises(ValueError, match="no module matched"):
        calibrate(model, token_batches(1), target_modules=["qkv"], progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        calibrate(model, token_batches(1), max_batches=0, progress=False)


@pytest.mark.slow  # two fresh interpreters import torch and transformers
def test_two_process_gloo_all_reduce_equals_one_process(tmp_path):

    from .calibrate_workers import calibrate_worker

    spawn_and_join(calibrate_worker, (2, free_port(), str(tmp_path)), nprocs=2)
    everything = calibrate(tiny_model("llama"), token_batches(4, seed=5), progress=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        expected_error = "NonFiniteCalibrationError" if rank == 1 else "RuntimeError: calibration failed on rank 1"
        for tag in ("", "_sequential"):  # both calibration modes
            assert got["error" + tag].startswith(expected_error), got["error" + tag]
            for key in ("halves" + tag, "one_rank" + tag):
                assert set(got[key]) == set(everything)
                for name, C in everything.items():
                    assert_close(got[key][name], C, torch.float32, f"rank {rank} {key} {name}", tol=1e-5)
    # A stack that is not a chain on one rank's data only: both ranks fell back to one pass, with the global statistic.
    from .calibrate_workers import OddBatchesTransformed, odd_batches

    one_pass = calibrate(OddBatchesTransformed(), odd_batches(0) + odd_batches(1), progress=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["not_a_chain_warned"]
        for name, C in one_pass.items():
            assert_close(got["not_a_chain"][name], C, torch.float32, f"rank {rank} not a chain {name}", tol=1e-5)
    # Block by block inside inject, every rank builds the same adapters, in the null space of the global statistic.
    # (Not compared with a one-process inject: 96 tokens leave these covariances with several eigenvalues at the
    # rounding floor, where which r of them the solver picks is down to rounding.)
    adapters = [torch.load(tmp_path / f"rank{rank}.pt")["adapter"] for rank in (0, 1)]
    assert set(adapters[0]) == set(adapters[1]) and len(adapters[0]) == 14
    for name, A in adapters[0].items():
        assert_close(adapters[1][name], A, torch.float32, f"rank 1 adapter {name}", tol=1e-6)
        C = everything[name].double()
        floor = torch.linalg.eigvalsh(C)[:4].sum().item() / C.trace().item()  # the exact null space's share
        assert lk.nullspace.energy_fraction(C, lk.nullspace.row_space_basis(A)) <= 1.01 * floor + 1e-6, name
