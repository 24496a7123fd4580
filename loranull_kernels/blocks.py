"""The block stack of a model and the calibration set's inputs of one block (block-sequential calibration).

A *block stack* is an ``nn.ModuleList`` of at least two modules of one class (the decoder layers of Llama / Qwen2 /
Mistral, GPT-2's ``h``, BERT's ``encoder.layer``), found generically: of every such list, the one holding the most
targeted layers (the outermost on a tie, so a list of experts inside a block never wins over the blocks).

:func:`capture_inputs` runs the model on the calibration set up to the first block and keeps, per batch, the
block's hidden-state input and its other arguments (attention masks, position embeddings...): every later block is
then run alone by :meth:`BlockInputs.run` on the previous block's outputs. Caches are off (``config.use_cache`` is
set to False for the capture, and any cache object in the arguments is replaced by None).

Most models hand every block the very same extra arguments. That is checked on the first batch, where the whole
model runs with every block's arguments recorded: if some block gets different ones (per-layer masks such as
sliding-window layers), every batch is captured that way and each block gets its own.

Running blocks alone reproduces the model only when its forward is a plain chain of the stack: each block called
once, in order, on the previous block's output. The first batch checks that too (call counts and order, and that
block i + 1's hidden-state input equals block i's output); a model that transforms the hidden states between
blocks (``x = 0.5 * (x + block(x))``) or runs its stack twice (weight-shared / looped models such as ALBERT) is
reported as :class:`NotAChain` before any statistic is taken.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn


def find_block_stack(model: nn.Module, target_names: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """``(name, ModuleList)`` of the model's block stack holding the most of ``target_names``, or None."""
    names = list(target_names)
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(b) for b in module}) != 1:
            continue
        prefix = f"{name}." if name else ""
        count = sum(1 for t in names if t.startswith(prefix))
        if count and (best is None or count > best[2]):
            best = (name, module, count)
    return None if best is None else (best[0], best[1])


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors inside dicts / lists / tuples moved to ``device`` (other objects as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    return obj


def _is_cache(obj: Any) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(obj).__mro__)


def _no_cache(obj: Any) -> Any:
    return None if _is_cache(obj) else obj


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns: the tensor itself, or the first entry of a tuple / ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return block_output(out.to_tuple())
    raise TypeError(f"block-sequential calibration: a block returned {type(out).__name__}, not hidden states "
                    "(a tensor, or a tuple starting with one); use calibration_mode='one_pass'")


class _Stop(Exception):
    """Raised by the capture hook on the first block: the rest of the forward pass is not needed."""


class NotAChain(ValueError):
    """The model's forward does not run its block stack as a plain chain, so block-sequential calibration would
    compute other statistics than one pass (see the module docstring); ``reason`` says what the first batch showed."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"block-sequential calibration cannot reproduce this model's forward pass: {reason}; use "
                         "calibration_mode='one_pass'")


def _call_order_problem(calls: list[int], n: int) -> str | None:
    """Why the blocks' calls in one forward pass (indices, in call order) are not ``0, 1, ..., n − 1``, or None."""
    if calls == list(range(n)):
        return None
    counts = {i: calls.count(i) for i in range(n)}
    repeated = [i for i, c in counts.items() if c > 1]
    if repeated:
        return (f"block {repeated[0]} ran {counts[repeated[0]]} times in one forward pass (a looped or weight-shared "
                "block stack)")
    missing = [i for i, c in counts.items() if c == 0]
    if missing:
        return f"block(s) {missing[:4]} never ran in the forward pass"
    return f"the blocks ran in the order {calls[:8]}{' ...' if len(calls) > 8 else ''}, not one after the other"


class _ChainCheck:
    """Whether each block's hidden-state input is the previous block's output, unchanged (one forward pass).

    The output is copied when the block returns: a model may change it in place before the next block runs."""

    def __init__(self):
        self.last: tuple[int, torch.Tensor | None] | None = None  # (block index, copy of its output)
        self.problem: str | None = None

    def after(self, i: int, out: Any) -> None:
        try:
            hidden = block_output(out)
        except TypeError:
            hidden = None
            self.problem = self.problem or f"block {i} returned {type(out).__name__}, not hidden states"
        self.last = (i, None if hidden is None else hidden.detach().clone())

    def before(self, i: int, hidden: torch.Tensor) -> None:
        if self.problem is not None or i == 0 or self.last is None or self.last[0] != i - 1:
            return  # the call order is judged on its own
        out = self.last[1]
        # Bit for bit, NaN included: non-finite activations are the calibration's error to report, not a change.
        if out is None or out.shape != hidden.shape or out.dtype != hidden.dtype or not torch.allclose(
                out.to(hidden.device), hidden.detach(), rtol=0, atol=0, equal_nan=True):
            self.problem = (f"the hidden states change between block {i - 1} and block {i} (block {i}'s input is "
                            f"not block {i - 1}'s output)")
        self.last = None


class BlockInputs:
    """The calibration set's inputs of the current block, batch by batch.

    ``hidden[b]``: the hidden states of batch b (on the CPU with ``offload="cpu"``). ``token_masks[b]``: the
    batch's (batch, seq) bool attention mask or None. The extra arguments are shared by all blocks
    (``extras[b] = (args, kwargs)``) or, when the first batch showed per-block arguments, per block
    (``extras[b][i]``).
    """

    def __init__(self, offload: str | None):
        self.offload = offload
        self.hidden: list[torch.Tensor] = []
        self.token_masks: list[torch.Tensor | None] = []
        self.extras: list = []
        self.hidden_as: str | None = None  # "arg": args[0]; "kwarg": kwargs["hidden_states"]
        self.per_block = False
        self.not_chain: str | None = None  # why the first batch showed the stack is not a plain chain

    def __len__(self) -> int:
        return len(self.hidden)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def _store(self, h: torch.Tensor) -> torch.Tensor:
        return h.detach().to("cpu") if self.offload == "cpu" else h.detach()

    def _split(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple]:
        if args and isinstance(args[0], torch.Tensor):
            where, hidden, rest = "arg", args[0], (tuple(_no_cache(a) for a in args[1:]), dict(kwargs))
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            rest_kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            where, hidden, rest = "kwarg", kwargs["hidden_states"], (tuple(_no_cache(a) for a in args), rest_kw)
        else:
            raise TypeError("block-sequential calibration: the first block was called without a hidden-state tensor "
                            "(neither its first positional argument nor hidden_states=); use calibration_mode='one_pass'")
        rest[1].update({k: _no_cache(v) for k, v in rest[1].items()})
        if "use_cache" in rest[1]:
            rest[1]["use_cache"] = False
        if self.hidden_as is None:
            self.hidden_as = where
        return hidden, rest

    def capture(self, model: nn.Module, blocks: nn.ModuleList, batches: Iterable, run_model: Callable,
                token_mask: Callable) -> None:
        """Run ``run_model(batch)`` for each batch, keeping the inputs of ``blocks[0]`` (and the extra arguments of
        every block, see the module docstring)."""
        config = getattr(model, "config", None)
        had_cache = getattr(config, "use_cache", None)
        if had_cache is not None:
            config.use_cache = False
        try:
            for b, batch in enumerate(batches):
                self.token_masks.append(token_mask(batch))
                if b == 0 or self.per_block:
                    self._capture_all(blocks, batch, run_model, first=b == 0)
                    if self.not_chain is not None:  # nothing captured would be used: the caller falls back
                        return
                else:
                    self._capture_first(blocks, batch, run_model)
        finally:
            if had_cache is not None:
                config.use_cache = had_cache

    def _capture_first(self, blocks, batch, run_model) -> None:
        seen = {}

        def hook(module, args, kwargs):
            seen["inputs"] = self._split(args, kwargs)
            raise _Stop

        handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            run_model(batch)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "inputs" not in seen:
            raise RuntimeError("block-sequential calibration: the model's forward never called its first block")
        hidden, rest = seen["inputs"]
        self.hidden.append(self._store(hidden))
        self.extras.append(rest)

    def _capture_all(self, blocks, batch, run_model, first: bool) -> None:
        seen: dict[int, tuple] = {}
        calls: list[int] = []  # block indices in call order
        chain = _ChainCheck() if first else None
        handles = []
        for i, block in enumerate(blocks):
            def hook(module, args, kwargs, i=i):
                calls.append(i)
                split = self._split(args, kwargs)
                if chain is not None:
                    chain.before(i, split[0])
                if i not in seen:  # a block called twice in one pass keeps its first call
                    seen[i] = split
            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
            if chain is not None:
                handles.append(block.register_forward_hook(lambda module, args, out, i=i: chain.after(i, out)))
        try:
            run_model(batch)
        finally:
            for h in handles:
                h.remove()
        if chain is not None:
            self.not_chain = _call_order_problem(calls, len(blocks)) or chain.problem
            if self.not_chain is not None:
                return
        if sorted(seen) != list(range(len(blocks))):
            missing = sorted(set(range(len(blocks))) - set(seen))
            raise RuntimeError(f"block-sequential calibration: block(s) {missing[:4]} never ran in the forward pass; "
                               "use calibration_mode='one_pass'")
        self.hidden.append(self._store(seen[0][0]))
        extras = [seen[i][1] for i in range(len(blocks))]
        if first:
            self.per_block = not all(_same(e, extras[0]) for e in extras[1:])
        self.extras.append(extras if self.per_block else extras[0])

    def _extras(self, b: int, i: int) -> tuple[tuple, dict]:
        e = self.extras[b]
        return e[i] if self.per_block else e

    def run(self, block: nn.Module, i: int, before_batch: Callable[[int], None], keep_outputs: bool) -> None:
        """Run ``block`` (the i-th of the stack) on every batch (``before_batch(b)`` first); with ``keep_outputs``
        its outputs replace the stored hidden states, batch by batch, as the next block's inputs."""
        device = module_device(block)
        for b in range(len(self.hidden)):
            args, kwargs = to_device(self._extras(b, i), device)
            h = self.hidden[b].to(device)
            before_batch(b)
            if self.hidden_as == "arg":
                out = block(h, *args, **kwargs)
            else:
                out = block(*args, hidden_states=h, **kwargs)
            if keep_outputs:
                self.hidden[b] = self._store(block_output(out))
            del out, h
