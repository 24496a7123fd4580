"""Roofline model of the fused LoRA linear: FLOPs, bytes and predicted time of each Triton kernel.

The prediction written before a GPU measures anything (docs/performance.md): each kernel takes
``max(FLOPs / peak FLOP rate, bytes / peak bandwidth)`` plus the integer work of its dropout draws, and the frozen
``nn.Linear`` (forward + dX, no dW: the benchmark's denominator) is modelled the same way, so the predicted ratio is
the one ``loranull-bench`` measures. Bytes are compulsory traffic (each operand read once, each result written
once: perfect on-chip reuse), so the model is a floor for every kernel, not a simulation.

Dropout masks are regenerated, never stored: one Philox-4x32-10 call (``tl.rand4x``) draws the uniforms of four
elements, ~40 instructions (10 rounds of two wide 32-bit multiplies and two three-input xors; the key schedule is
uniform across the tile), issued at the SM's instruction rate (4 schedulers × 32 lanes a clock) and counted here as
not overlapped with the tile's loads or MMAs (a pessimistic bound; the GPU run is to confirm the estimate).

Usage::

    from loranull_kernels.bench.roofline import predict, H100
    p = predict(8192, 4096, 4096, 16, dtype="bf16", dropout=0.1, device=H100)
    p.ratio, p.total_s, [(k.name, k.time_s) for k in p.kernels]
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

PHILOX_OPS = 40  # instruction issues per Philox call (estimate; see the module docstring)
ELEMENTS_PER_CALL = 4  # the kernels' _keep: one tl.rand4x call masks four consecutive columns
FEATURES = ("bias", "rank_scale", "masks")
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class Device:
    """Peak rates of a GPU (dense, no sparsity): FLOP/s per input dtype, bytes/s of HBM, instruction issues/s
    (SMs × 128 lanes × clock: what bounds the integer work of the Philox draws)."""

    name: str
    flops: dict
    bandwidth: float
    int_ops: float
    launch_s: float = 3e-6  # one kernel launch, back to back on a stream (measured order of magnitude)


# H100 SXM: 989 TFLOP/s bf16/fp16 dense, 494 TF32, 67 fp32 FMA; 3.35 TB/s; 132 SMs × 128 lanes × 1.83 GHz.
H100 = Device("H100 SXM", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}, 3.35e12, 30.9e12)
# H200: the H100's compute, 4.8 TB/s of HBM3e.
H200 = Device("H200", dict(H100.flops), 4.8e12, 30.9e12)
# A100 SXM: 108 SMs × 128 lanes × 1.41 GHz.
A100 = Device("A100 SXM", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 2.039e12, 19.5e12)
DEVICES = {"h100": H100, "h200": H200, "a100": A100}


def device_for(name: str) -> Device | None:
    """The peak rates for a ``torch.cuda.get_device_name()`` string ("NVIDIA H100 80GB HBM3" → ``H100``), or None
    for a device the model has no rates for."""
    return next((d for key, d in DEVICES.items() if key in name.lower()), None)


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """One kernel launch: FLOPs, compulsory bytes, Philox calls (``draws``), and its predicted time on the device."""

    name: str
    phase: str  # "forward" or "backward"
    flops: float
    bytes: float
    draws: float
    time_s: float
    bound: str  # "compute", "memory" (which roof sets the time), "+philox" appended when draws add to it

    @property
    def intensity(self) -> float:
        """FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else float("inf")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Every kernel of one forward + backward, the frozen layer's forward + dX, and their ratio."""

    kernels: tuple
    frozen: tuple
    device: Device

    @property
    def forward_s(self) -> float:
        return sum(k.time_s for k in self.kernels if k.phase == "forward")

    @property
    def backward_s(self) -> float:
        return sum(k.time_s for k in self.kernels if k.phase == "backward")

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def frozen_s(self) -> float:
        return sum(k.time_s for k in self.frozen)

    @property
    def ratio(self) -> float:
        """Predicted time(LoRA forward + backward) / time(frozen nn.Linear forward + dX)."""
        return self.total_s / self.frozen_s

    def rows(self) -> list[dict]:
        """One dict per kernel (and the frozen layer's two GEMMs), for a CSV or a table."""
        return [dict(kernel=k.name, phase=k.phase, gflop=k.flops / 1e9, mbytes=k.bytes / 1e6,
                     intensity=k.intensity, predicted_us=k.time_s * 1e6, bound=k.bound)
                for k in (*self.kernels, *self.frozen)]


def _cost(name, phase, flops, nbytes, draws, rate, device: Device) -> KernelCost:
    compute, memory = flops / rate, nbytes / device.bandwidth
    philox = draws * PHILOX_OPS / device.int_ops
    bound = ("compute" if compute >= memory else "memory") + ("+philox" if draws else "")
    return KernelCost(name, phase, flops, nbytes, draws, max(compute, memory) + philox + device.launch_s, bound)


def predict(M: int, K: int, N: int, r: int, dtype: str = "bf16", dropout: float = 0.0,
            features: Iterable[str] = (), device: Device = H100, train_A: bool = True,
            adapter_dtype: str | None = None) -> Prediction:
    """Roofline prediction of ``lora_linear`` on the Triton backend (the five kernels of its graph split) and of
    the frozen ``nn.Linear`` it replaces.

    Args:
        M, K, N, r: tokens, in_features, out_features, rank (x (M, K), W (N, K), A (r, K), B (N, r)).
        dtype: "bf16", "fp16" or "fp32" (x, W, y and the gradients; fp32 dots at the fp32 FMA rate, as torch's
            default "highest" matmul precision asks). adapter_dtype: A and B's (default: dtype).
        dropout: the adapter path's dropout probability (> 0: Philox calls in down, dx and da).
        features: any of "bias", "rank_scale", "masks" (RoseLoRA's masks of A and B, one byte per entry).
        device: peak rates (``H100``, ``H200``, ``A100`` or your own ``Device``).
        train_A: False drops the dA kernel (LoRA-Null v2's frozen A).
    Returns:
        ``Prediction``: ``.kernels`` (name, phase, flops, bytes, predicted time), ``.forward_s``, ``.backward_s``,
        ``.total_s``, ``.frozen_s`` and ``.ratio`` (the benchmark's figure of merit).
    """
    features = set(features)
    unknown = features - set(FEATURES)
    if unknown:
        raise ValueError(f"features: unknown {sorted(unknown)}; choose from {FEATURES}")
    if dtype not in _BYTES:
        raise ValueError(f"dtype must be one of {sorted(_BYTES)}, got {dtype!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    for name, v in (("M", M), ("K", K), ("N", N), ("r", r)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    e, ea = _BYTES[dtype], _BYTES[adapter_dtype or dtype]
    rate = device.flops[dtype]
    f32 = 4
    bias = N * e if "bias" in features else 0
    scale = r * ea if "rank_scale" in features else 0
    mask_a = r * K if "masks" in features else 0
    mask_b = N * r if "masks" in features else 0
    draws = M * K / ELEMENTS_PER_CALL if dropout > 0 else 0
    x, w, y = M * K * e, N * K * e, M * N * e
    a, b, h = r * K * ea + mask_a, N * r * ea + mask_b, M * r * f32

    k = [
        _cost("lora_down", "forward", 2 * M * K * r, x + a + h, draws, rate, device),
        _cost("lora_forward", "forward", 2 * M * N * K + 2 * M * N * r, x + w + h + b + scale + bias + y, 0, rate,
              device),
        # dG = s·dY B and dB = s·dYᵀ(H⊙d): one pass over dY; dB reduced in fp32 (N × r).
        _cost("lora_dy", "backward", 4 * M * N * r, y + b + h + scale + M * r * f32 + N * r * f32
              + (N * f32 if bias else 0), 0, rate, device),
        _cost("lora_dx", "backward", 2 * M * N * K + 2 * M * K * r, y + w + M * r * f32 + a + scale + x, draws, rate,
              device),
    ]
    if train_A:
        k.append(_cost("lora_da", "backward", 2 * M * K * r, x + M * r * f32 + scale + mask_a + r * K * f32, draws,
                       rate, device))
    frozen = (_cost("frozen_forward", "forward", 2 * M * N * K, x + w + y + bias, 0, rate, device),
              _cost("frozen_dx", "backward", 2 * M * N * K, y + w + x, 0, rate, device))
    return Prediction(tuple(k), frozen, device)
