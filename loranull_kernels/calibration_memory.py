"""How much memory calibration's covariances will take, checked before any work starts.

Each distinct input of the targeted layers gets one float32 ``(in, in)`` covariance on the layer's device. Which
layers share an input is only known once the model runs; the estimate assumes that sibling layers (same parent
module, same ``in_features``, same device: q/k/v, gate/up) share one, as they do in the usual transformer blocks,
so it is a lower bound rather than a guess on the high side: a refusal is never a false alarm. The null-space
solve adds its float64 workspace (two ``in × in`` float64 matrices per covariance of the largest size) on top.
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import nn

from .targets import linear_shape


class CalibrationMemoryError(MemoryError):
    """Calibration's covariances would not fit in the free memory of a device; raised before any work starts."""


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def covariance_bytes(targets: list[tuple[str, nn.Module]], solve: bool = True) -> dict[torch.device, int]:
    """Bytes per device of the covariances of ``targets`` held at once (siblings sharing an input counted once),
    plus, with ``solve``, the solver's float64 workspace for the largest of them."""
    seen: set = set()
    need: dict[torch.device, int] = defaultdict(int)
    largest: dict[torch.device, int] = defaultdict(int)
    for name, module in targets:
        n, dev = linear_shape(module)[0], _device(module)
        key = (name.rpartition(".")[0], n, dev)
        if key in seen:
            continue
        seen.add(key)
        need[dev] += 4 * n * n
        largest[dev] = max(largest[dev], n)
    if solve:
        for dev, n in largest.items():
            need[dev] += 2 * 8 * n * n
    return dict(need)


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes: CUDA's free memory plus what torch's allocator holds unused; the
    system's available RAM for the CPU (``MemAvailable``); None when unknown (no check then)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def check(targets: list[tuple[str, nn.Module]], per_block: list[list] | None, outside: list | None) -> None:
    """Refuse (:class:`CalibrationMemoryError`) when the covariances held at once exceed a device's free memory.

    ``per_block``/``outside`` None: one pass, everything at once. Else block by block: the largest block plus the
    targets outside the stack at once.
    """
    if per_block is None:
        phases, mode = [targets], "one_pass"
    else:
        # the targets outside the stack are calibrated first and adapted last: held during every block
        phases, mode = [ts + list(outside or []) for ts in per_block if ts] or [list(outside or [])], "sequential"
    need: dict[torch.device, int] = defaultdict(int)
    for ts in phases:
        for dev, b in covariance_bytes(ts).items():
            need[dev] = max(need[dev], b)
    for dev, b in need.items():
        free = free_bytes(dev)
        if free is None or b <= free:
            continue
        if mode == "one_pass":
            way_out = ("calibrate block by block: calibration_mode='sequential' (one block's covariances at a time; "
                       "offload='cpu' also keeps the calibration set's hidden states off the device)")
        else:
            way_out = ("target fewer layers per block (exclude_modules), or put the model on a device with more "
                       "memory; offload='cpu' keeps the calibration set's hidden states off the device")
        raise CalibrationMemoryError(
            f"calibration ({mode}) would hold {_gib(b)} of covariances and solver workspace at once on {dev}, but "
            f"only {_gib(free)} are free there: {way_out}")
