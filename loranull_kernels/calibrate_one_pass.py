"""Calibration in one forward pass: hooks on the targeted layers of a model feed their input statistics, and the
pieces both calibration modes share (the hooks' state, batches, torch.distributed). :mod:`.calibrate` is the entry
point; :mod:`.calibrate_sequential` runs the same hooks block by block.

Forward pre-hooks on the targeted layers feed one :class:`~loranull_kernels.covariance.CovarianceAccumulator` per
distinct input (through :func:`loranull_kernels.covariance_update`, so the Triton kernel runs on GPU).

Shared inputs: layers that receive *the very same tensor object* in a forward pass (q/k/v projections reading the
normalised hidden states; gate/up projections reading the MLP input) are detected by tensor identity (``id`` plus
a weak reference, so a recycled id is never mistaken for the same tensor) and share ONE accumulator, so their
covariance is computed once; the dict returned maps each of them to the same tensor. The grouping found in the
first batch is checked in every later one (a model whose sharing changes from batch to batch is refused rather than
silently mis-accumulated).
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

from .blocks import module_device as _model_device
from .blocks import to_device as _to_device
from .covariance_accumulator import CovarianceAccumulator
from .targets import linear_shape


class Calibration:
    """The hooks' shared state: accumulators, the input-sharing groups and the current batch's token mask."""

    def __init__(self, targets: list[tuple[str, nn.Module]], normalize: bool):
        self.names = [n for n, _ in targets]
        self.dims = {n: linear_shape(m)[0] for n, m in targets}
        self.normalize = normalize
        self.leader: dict[str, str] = {}  # module name -> name of the module owning its accumulator
        self.acc: dict[str, CovarianceAccumulator] = {}
        self.token_mask: torch.Tensor | None = None
        self.seen: dict[int, tuple[weakref.ref, str]] = {}  # id(x) -> (x, first module that read it) this batch
        self.warned: set[str] = set()

    def start_batch(self, token_mask: torch.Tensor | None) -> None:
        self.token_mask = token_mask
        self.seen.clear()

    def end_batch(self) -> None:
        self.seen.clear()
        self.token_mask = None

    def _mask_for(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        m = self.token_mask
        if m is None:
            return None
        if m.device != x.device:  # models split across devices: the mask follows the layer
            m = m.to(x.device)
        if x.shape[:-1] == m.shape:
            return m
        if x.dim() == 2 and x.shape[0] == m.numel():
            return m.reshape(-1)
        if x.dim() == 2 and x.shape[0] == m.shape[0]:
            return None  # one vector per sample (a pooler's input): no token is padding
        if name not in self.warned:
            self.warned.add(name)
            warnings.warn(f"calibration: layer {name!r} sees inputs of shape {tuple(x.shape)} that do not line up "
                          f"with the attention mask {tuple(m.shape)}; its padding tokens (if any) are not masked",
                          stacklevel=3)
        return None

    def hook(self, name: str):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"calibration: layer {name!r} was called without a tensor input")
            entry = self.seen.get(id(x))
            owner = entry[1] if entry is not None and entry[0]() is x else None
            if owner is not None and owner != name:
                # Another targeted layer already accumulated this exact tensor in this forward pass: share its
                # accumulator (grouping fixed by the first batch that shows it, then checked).
                expected = self.leader.get(owner, owner)
                if name not in self.leader and name not in self.acc:
                    self.leader[name] = expected
                elif self.leader.get(name) != expected:
                    raise RuntimeError(f"calibration: layer {name!r} read the same input tensor as {owner!r} in this "
                                       "batch but not in an earlier one; input sharing must not change between batches")
                return None
            if self.leader.setdefault(name, name) != name:
                raise RuntimeError(f"calibration: layer {name!r} shared its input with {self.leader[name]!r} in an "
                                   "earlier batch but not in this one; input sharing must not change between batches")
            self.seen[id(x)] = (weakref.ref(x), name)
            acc = self.acc.get(name)
            if acc is None:
                acc = self.acc[name] = CovarianceAccumulator(self.dims[name], normalize=self.normalize, name=name)
            acc.update(x, self._mask_for(name, x))
            return None

        return pre_hook

    def all_reduce(self) -> None:
        """Agree on the sharing groups across ranks (a rank may have had no data), then sum every accumulator."""
        import torch.distributed as dist

        groups: list = [None] * dist.get_world_size()
        dist.all_gather_object(groups, self.leader if self.leader else None)
        known = [g for g in groups if g is not None]
        if any(g != known[0] for g in known[1:]):
            raise RuntimeError("calibration: the ranks found different input-sharing groups")
        if known:
            self.leader = dict(known[0])
        for name in self.names:  # the same order on every rank
            if self.leader.get(name, name) == name and name in self.leader:
                acc = self.acc.get(name)
                if acc is None:
                    acc = self.acc[name] = CovarianceAccumulator(self.dims[name], normalize=self.normalize, name=name)
                acc.all_reduce()

    def results(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names if n not in self.leader]
        if missing:
            raise ValueError(f"calibration: layer(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} never ran "
                             "during the forward passes (not used by this model's forward?)")
        means = {n: self.acc[n].mean() for n in self.names if self.leader[n] == n}
        return {n: means[self.leader[n]] for n in self.names}


def run_batch(model: nn.Module, batch: Any):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    raise TypeError(f"calibration batches must be a dict (model(**batch)), a tensor (model(batch)) or a "
                    f"tuple/list (model(*batch)); got {type(batch).__name__}")


def token_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m.bool()
    return None


def iterate_batches(data: Iterable, device: torch.device, max_batches: int | None, show: bool, desc: str):
    """The batches of ``data`` (at most ``max_batches``) moved to ``device``, behind a tqdm bar when ``show``."""
    from tqdm.auto import tqdm

    total = None
    if hasattr(data, "__len__"):
        total = len(data) if max_batches is None else min(len(data), max_batches)
    elif max_batches is not None:
        total = max_batches
    with tqdm(data, total=total, desc=desc, unit="batch", disable=not show) as bar:
        for n, batch in enumerate(bar):
            if max_batches is not None and n >= max_batches:
                break
            yield _to_device(batch, device)


def _accumulate(model: nn.Module, targets: list[tuple[str, nn.Module]], state: Calibration, data: Iterable,
                max_batches: int | None, show: bool) -> int:
    """Run the batches with the hooks in place; returns the number of batches. Hooks and modes always restored."""
    device = _model_device(model)
    modes = {m: m.training for m in model.modules()}
    handles = []
    n_batches = 0
    try:
        model.eval()
        for name, module in targets:
            handles.append(module.register_forward_pre_hook(state.hook(name), with_kwargs=True))
        with torch.no_grad():
            for batch in iterate_batches(data, device, max_batches, show, "calibrating"):
                state.start_batch(token_mask(batch))
                run_batch(model, batch)
                state.end_batch()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return n_batches


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def on_every_rank(fn):
    """``fn()``; under torch.distributed, a failure on any rank is raised on every rank (after all of them ran ``fn``),
    so that no rank waits forever in a later collective for one that failed."""
    if not distributed():
        return fn()
    import torch.distributed as dist

    error, result = None, None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, msg in enumerate(failures) if msg is not None]
    if failed:
        raise RuntimeError(f"calibration failed on rank {failed[0][0]}: {failed[0][1]}")
    return result


def check_max_batches(max_batches) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")


def calibrate_modules(model: nn.Module, targets: list[tuple[str, nn.Module]], data: Iterable, *,
                      normalize: bool = False, progress: bool = True,
                      max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`calibrate` in one pass on already-resolved ``(name, module)`` targets (what
    :func:`~loranull_kernels.inject` calls)."""
    import torch.distributed as dist

    check_max_batches(max_batches)
    state = Calibration(targets, normalize)
    multi = distributed()
    show = progress and not (multi and dist.get_rank() != 0)
    if not multi:
        if _accumulate(model, targets, state, data, max_batches, show) == 0:
            raise ValueError("calibration data is empty: it yielded no batch")
        return state.results()
    # Every rank must reach the collectives below, even when its own batches failed: otherwise the other ranks
    # would wait forever. So a local error is shared first, then raised on every rank.
    on_every_rank(lambda: _accumulate(model, targets, state, data, max_batches, show))
    state.all_reduce()
    if not state.leader:
        raise ValueError("calibration data is empty: no batch on any rank")
    return state.results()
