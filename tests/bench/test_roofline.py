"""The roofline model of the fused LoRA linear: FLOP and byte counts, which roof binds, and the ratio's limits."""
import dataclasses

import pytest

from loranull_kernels.bench.roofline import H100, predict

REF = dict(M=8192, K=4096, N=4096, r=16)


def test_flops_add_up_to_the_lora_overhead():
    """The adapter adds 6·M·r·(K + N) FLOPs to the frozen layer's 4·M·N·K: 1.17% at the reference shape."""
    p = predict(**REF)
    M, K, N, r = REF.values()
    extra = sum(k.flops for k in p.kernels) - sum(k.flops for k in p.frozen)
    assert extra == 6 * M * r * (K + N)
    assert extra / (4 * M * N * K) == pytest.approx(0.0117, abs=5e-5)


def test_big_gemms_compute_bound_skinny_passes_memory_bound():
    p = predict(**REF, dtype="bf16")
    bound = {k.name: k.bound for k in p.kernels}
    assert bound["lora_forward"] == bound["lora_dx"] == "compute"
    assert bound["lora_down"] == bound["lora_dy"] == bound["lora_da"] == "memory"
    # x, 64 MiB of bf16, is read once by lora_down: its time is that read at 3.35 TB/s, give or take H and A.
    down = next(k for k in p.kernels if k.name == "lora_down")
    assert 20e-6 < down.time_s < 27e-6


def test_ratio_falls_toward_the_flop_ratio_with_infinite_bandwidth_and_no_launch_cost():
    ideal = dataclasses.replace(H100, bandwidth=1e30, launch_s=0.0)
    assert predict(**REF, device=ideal).ratio == pytest.approx(1.0117, abs=1e-4)
    assert predict(**REF).ratio > 1.05  # three skinny passes over x / dY cost real bandwidth


def test_dropout_costs_philox_draws_in_three_kernels_and_nothing_else():
    plain, drop = predict(**REF), predict(**REF, dropout=0.1)
    slower = {k.name for k, k0 in zip(drop.kernels, plain.kernels) if k.time_s > k0.time_s}
    assert slower == {"lora_down", "lora_dx", "lora_da"}
    assert drop.ratio > plain.ratio


def test_frozen_A_drops_the_dA_kernel_and_features_add_bytes():
    assert "lora_da" not in {k.name for k in predict(**REF, train_A=False).kernels}
    plain, full = predict(**REF), predict(**REF, features=("bias", "rank_scale", "masks"))
    assert all(f.bytes >= p.bytes for f, p in zip(full.kernels, plain.kernels))
    assert sum(f.bytes for f in full.kernels) > sum(p.bytes for p in plain.kernels)


def test_fp32_runs_at_the_fma_rate():
    assert predict(**REF, dtype="fp32").frozen_s > 10 * predict(**REF, dtype="bf16").frozen_s


@pytest.mark.parametrize("kw, word", [(dict(features=("dropout",)), "features"), (dict(dtype="int8"), "dtype"),
                                      (dict(dropout=1.0), "dropout"), (dict(r=0), "r")])
def test_bad_arguments_name_themselves(kw, word):
    args = dict(REF, **kw)
    with pytest.raises(ValueError, match=word):
        predict(**args)


def test_device_for_matches_cuda_device_names():
    from loranull_kernels.bench.roofline import A100, H200, device_for

    assert device_for("NVIDIA H100 80GB HBM3") is H100 and device_for("NVIDIA H200") is H200
    assert device_for("NVIDIA A100-SXM4-80GB") is A100 and device_for("AMD EPYC") is None
