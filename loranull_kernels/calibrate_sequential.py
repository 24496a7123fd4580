"""Block-sequential calibration (the GPTQ / AWQ recipe): one block's covariances in memory at a time.

The calibration set is run up to the first block of the model's block stack (:mod:`loranull_kernels.blocks`);
then block i alone runs over the stored inputs with the calibration hooks on its targeted layers, its outputs
become block i + 1's inputs, and ``on_block`` receives its covariances (:func:`~loranull_kernels.inject` turns
them into adapters there and drops them). Targeted layers outside the stack (BERT's pooler...) are calibrated
before any block, in one pass over the whole model with hooks on them only, and handed to ``on_block`` last:
calibrating them after the blocks were adapted would change their inputs by float32 rounding, which is enough to
rotate a null space that is degenerate (a pooler sees one vector per sample: a handful of samples leave most of its
eigenvalues at the rounding floor).

The capture comes first of all: its first batch shows whether the model runs the stack as a plain chain
(:mod:`loranull_kernels.blocks`); if not, :class:`~loranull_kernels.blocks.NotAChain` is raised (on every rank)
before any statistic is taken or any ``on_block`` call, and :func:`loranull_kernels.calibrate.calibrate_groups`
refuses or falls back to one pass.

Block i's outputs are those of the block *as it was* when its statistics were taken, i.e. what the whole model
computes in one pass: the covariances equal the one-pass ones up to float32 rounding (the very same operations on
the very same inputs, in practice to the bit). With an output-preserving initialisation (LoRA-Null) the adapted
block would produce the same outputs anyway.

Peak extra memory: the covariances of one block, plus the calibration set's hidden states (on the CPU with
``offload="cpu"``, moved to the block's device one batch at a time), plus one batch's activations.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch
from torch import nn

from .blocks import BlockInputs, NotAChain, find_block_stack, module_device
from .calibrate_one_pass import (Calibration, calibrate_modules, check_max_batches, distributed, iterate_batches,
                                 on_every_rank, run_batch, token_mask)

MODES = ("auto", "sequential", "one_pass")
OFFLOADS = (None, "cpu")

# on_block(block name, [(target name, module)], {target name: covariance}) -> an optional note for the progress bar
OnBlock = Callable[[str, list, dict], "str | None"]


def check_options(mode: str, offload: str | None) -> None:
    """ValueError naming the argument unless ``mode`` is one of :data:`MODES` and ``offload`` None or "cpu"."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"calibration_mode must be one of {MODES}, got {mode!r}")
    if offload is not None and offload != "cpu":
        raise ValueError(f"offload must be None or 'cpu', got {offload!r}")


def resolve_mode(model: nn.Module, targets: list[tuple[str, nn.Module]], mode: str,
                 offload: str | None) -> tuple[str, nn.ModuleList] | None:
    """The block stack to calibrate block by block, or None for one pass.

    ``"auto"``: sequential whenever a block stack holds some of the targets; ``"sequential"``: the same, and an error
    when there is none; ``"one_pass"``: None.

    Raises:
        ValueError: an unknown mode or offload, or ``"sequential"`` on a model without a block stack.
    """
    check_options(mode, offload)
    if mode == "one_pass":
        return None
    stack = find_block_stack(model, [n for n, _ in targets])
    if stack is None and mode == "sequential":
        raise ValueError("calibration_mode='sequential' needs a block stack (an nn.ModuleList of at least two blocks "
                         "of one class holding targeted layers); none was found in this model: use 'one_pass'")
    return stack


def split_targets(stack: tuple[str, nn.ModuleList], targets: list[tuple[str, nn.Module]]):
    """``(per_block, outside)``: the targets of each block of the stack (a list per block) and those outside it."""
    name, blocks = stack
    prefix = f"{name}." if name else ""
    per_block: list[list] = [[] for _ in blocks]
    outside = []
    for t in targets:
        head, _, rest = t[0][len(prefix):].partition(".") if t[0].startswith(prefix) else ("", "", "")
        if head.isdigit() and int(head) < len(blocks) and rest:
            per_block[int(head)].append(t)
        else:
            outside.append(t)
    return per_block, outside


def calibrate_blocks(model: nn.Module, targets: list[tuple[str, nn.Module]], data: Iterable,
                     stack: tuple[str, nn.ModuleList], on_block: OnBlock, *, normalize: bool = False,
                     progress: bool = True, max_batches: int | None = None, offload: str | None = None) -> None:
    """Calibrate ``targets`` block by block; ``on_block`` gets each block's covariances as soon as they are known.

    Args:
        model, targets, data, normalize, progress, max_batches: as :func:`~loranull_kernels.calibrate_modules`.
        stack: ``(name, ModuleList)`` from :func:`resolve_mode`.
        on_block: called once per block that holds targets, in order, then once for the targets outside the stack
            (name ``"<outside the block stack>"``, calibrated before the blocks), with ``{target name: (in, in) float32 covariance}`` (layers that
            share an input share one tensor). The block's modules may be replaced inside it: the block has run.
            A returned string is shown in the progress bar.
        offload: None (hidden states stay where the blocks put them) or ``"cpu"``.

    Under torch.distributed every rank runs the same blocks in the same order on its own share of the data; each
    block's covariances are all-reduced before ``on_block``, and a failure on one rank is raised on all of them.
    Module train/eval modes are restored and the hooks removed, also on errors.

    Raises:
        NotAChain: the first batch (of any rank) showed that the blocks run alone cannot reproduce the model;
            nothing was calibrated and ``on_block`` was not called.
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    check_max_batches(max_batches)
    multi = distributed()
    show = progress and not (multi and dist.get_rank() != 0)
    name, blocks = stack
    per_block, outside = split_targets(stack, targets)
    outside_covs = None
    # By name, not by module: a dict of the modules would keep every replaced layer (and its weight) alive until
    # the end, and the adapters created meanwhile must get their layer's mode back too.
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        model.eval()
        with torch.no_grad():
            inputs = BlockInputs(offload)
            batches = iterate_batches(data, module_device(model), max_batches, show, "capturing block inputs")
            # First, so that a model the blocks cannot reproduce is known before any statistic is taken.
            on_every_rank(lambda: inputs.capture(model, blocks, batches, lambda b: run_batch(model, b), token_mask))
            _raise_if_not_a_chain(inputs.not_chain, multi)
            if not multi and len(inputs) == 0:
                raise ValueError("calibration data is empty: it yielded no batch")
            if outside:  # before any block is adapted: see the module docstring
                outside_covs = calibrate_modules(model, outside, data, normalize=normalize, progress=progress,
                                                 max_batches=max_batches)
            last_needed = max((i for i, ts in enumerate(per_block) if ts), default=-1)
            bar = tqdm(range(last_needed + 1), desc="calibrating blocks", unit="block", disable=not show)
            for i in bar:
                note = _one_block(blocks[i], i, f"{name}.{i}" if name else str(i), per_block[i], inputs,
                                  keep_outputs=i < last_needed, normalize=normalize, multi=multi, on_block=on_block)
                if note:
                    bar.set_postfix_str(note, refresh=False)
                if show and note:
                    bar.write(f"block {i + 1}/{last_needed + 1} ({name}.{i}): {note}", file=sys.stderr)
            bar.close()
            del inputs
    finally:
        _restore_modes(model, modes)
    if outside_covs is not None:
        on_block("<outside the block stack>", outside, outside_covs)


def _raise_if_not_a_chain(reason: str | None, multi: bool) -> None:
    """:class:`~loranull_kernels.blocks.NotAChain` on every rank when the first batch of any rank showed that the
    blocks are not a plain chain (every rank must take the same way out)."""
    if multi:
        import torch.distributed as dist

        reasons: list = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, reason)
        reason = next((r for r in reasons if r is not None), None)
    if reason is not None:
        raise NotAChain(reason)


def _restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Train/eval modes back by module name; a module created meanwhile (an adapter and its children) takes the
    mode its name had, else its parent's."""
    for name, module in model.named_modules():  # parents come before their children
        parent = name.rpartition(".")[0]
        mode = modes.get(name, modes.get(parent, module.training))
        modes[name] = module.training = mode


def _one_block(block: nn.Module, i: int, block_name: str, targets: list, inputs: BlockInputs, *, keep_outputs: bool,
               normalize: bool, multi: bool, on_block: OnBlock) -> str | None:
    if not targets:  # a block without targets still maps its inputs to the next block's
        on_every_rank(lambda: inputs.run(block, i, lambda b: None, keep_outputs))
        return None
    state = Calibration(targets, normalize)
    handles = [m.register_forward_pre_hook(state.hook(n), with_kwargs=True) for n, m in targets]
    try:
        on_every_rank(lambda: inputs.run(block, i, lambda b: state.start_batch(inputs.token_masks[b]), keep_outputs))
    finally:
        state.end_batch()
        for h in handles:
            h.remove()
    if multi:
        state.all_reduce()
        if not state.leader:
            raise ValueError("calibration data is empty: no batch on any rank")
    covs = state.results()
    del state
    return on_block(block_name, targets, covs)
