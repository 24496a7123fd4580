"""Which modules of a model get adapters: ``AdapterConfig.target_modules`` / ``exclude_modules`` resolved to names.

One resolver shared by :func:`~loranull_kernels.inject` and :func:`~loranull_kernels.calibrate`, so both always
agree on the set of layers. Linear-like modules are the kinds of :mod:`~loranull_kernels.base_weights`: ``nn.Linear``,
Hugging Face's GPT-2 ``Conv1D`` (a linear layer whose weight is stored transposed, ``(in, out)``), and the quantized
linears of bitsandbytes (4-bit, 8-bit) and torchao.
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from .base_weights import base_weight
from .config import check_exclude_modules

# Modules (or the parents of modules) with these names are task heads trained from scratch, never adapted by
# "all-linear": the LM head, sequence-classification heads (PEFT's SEQ_CLS_HEAD_NAMES) and extractive-QA heads.
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D`` (weight stored (in, out))."""
    base = base_weight(module)
    return base is not None and base.fan_in_fan_out


def is_linear_like(module: nn.Module) -> bool:
    """True for the modules an adapter can be put on: every kind of :mod:`~loranull_kernels.base_weights`
    (``nn.Linear`` and subclasses, GPT-2's ``Conv1D``, bitsandbytes' and torchao's quantized linears)."""
    return base_weight(module) is not None


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module, or of an adapted :class:`LoRALinear`."""
    base = base_weight(module)
    if base is None:  # LoRALinear has nn.Linear's attributes without being one
        return module.in_features, module.out_features
    return base.in_features, base.out_features


def _suffix_match(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def output_head_names(model: nn.Module, linear=is_linear_like) -> set[str]:
    """Names of the linear-like modules that "all-linear" leaves out, by three explicit rules:

    1. the module ``model.get_output_embeddings()`` returns (Hugging Face models: the LM head);
    2. any linear-like module whose weight is the very Parameter of an ``nn.Embedding`` (a tied output layer);
    3. any linear-like module named, or inside a module named, one of :data:`HEAD_NAMES`
       (``lm_head``, ``score``, ``classifier``, ``qa_outputs``).
    """
    names = set()
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if not linear(module):
            continue
        parts = name.split(".")
        if (module is head or id(module.weight) in embedding_weights
                or any(p in HEAD_NAMES for p in parts)):
            names.add(name)
    return names


def _unsupported_parent(model: nn.Module, name: str) -> str | None:
    """Why the module ``name`` cannot be replaced by a wrapper, or None."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        # nn.MultiheadAttention reads out_proj.weight / .bias directly and never calls out_proj.forward: an adapter
        # there would be silently ignored.
        return "nn.MultiheadAttention reads out_proj.weight directly (its forward is never called)"
    return None


def candidate_summary(model: nn.Module, limit: int = 8) -> str:
    """A short list of the model's linear-like module names (distinct last components first), for error messages."""
    names = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    if not names:
        return "the model has no nn.Linear / Conv1D module at all"
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return (f"suffixes present: {leaves[:limit]}{' ...' if len(leaves) > limit else ''}; "
            f"e.g. full names {names[:3]}")


def find_targets(model: nn.Module, target_modules: str | Iterable[str] = "all-linear",
                 exclude_modules: Iterable[str] = (), *, adapted: bool = False) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to adapt, in ``named_modules`` order.

    Args:
        target_modules: ``"all-linear"`` (every nn.Linear / Conv1D but the output heads of
            :func:`output_head_names`), a list of module-name suffixes (``"q_proj"`` matches ``"...attn.q_proj"``; a
            full name matches itself), or one string taken as a regular expression matched with ``re.fullmatch``
            against full module names.
        exclude_modules: module-name suffixes removed from the match (a list; a bare string is refused).
        adapted: also accept :class:`~loranull_kernels.nn.LoRALinear` layers (calibrating an adapted model).

    Raises:
        TypeError: a module matched explicitly (suffix or regex) is not linear-like, or cannot be wrapped
            (nn.MultiheadAttention's out_proj); the message names it.
        ValueError: nothing matched (the message lists candidate names), or the model itself is the match.
    """
    exclude = exclude_modules if isinstance(exclude_modules, str) else list(exclude_modules or ())
    check_exclude_modules(exclude)
    named = [(n, m) for n, m in model.named_modules()]
    if adapted:
        from .nn import LoRALinear

        linear = lambda m: is_linear_like(m) or isinstance(m, LoRALinear)  # noqa: E731
    else:
        linear = is_linear_like
    if isinstance(target_modules, str) and target_modules == "all-linear":
        heads = output_head_names(model, linear)
        matched = [(n, m) for n, m in named if n and linear(m) and n not in heads
                   and _unsupported_parent(model, n) is None]
        explicit = False
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is taken as a regular expression and does not "
                             f"compile: {e}") from None
        matched = [(n, m) for n, m in named if pattern.fullmatch(n)]
        explicit = True
    else:
        suffixes = list(target_modules)
        matched = [(n, m) for n, m in named if _suffix_match(n, suffixes)]
        explicit = True
    matched = [(n, m) for n, m in matched if not _suffix_match(n, exclude)]
    if explicit:
        for n, m in matched:
            if n == "":
                raise ValueError("target_modules matched the model itself: wrap a lone nn.Linear with "
                                 "LoRALinear.from_linear instead of inject")
            if not linear(m):
                raise TypeError(f"target_modules={target_modules!r} matched module {n!r} of type "
                                f"{type(m).__name__}; only nn.Linear and transformers' Conv1D can be adapted "
                                "(narrow target_modules or add it to exclude_modules)")
            why = _unsupported_parent(model, n)
            if why is not None:
                raise TypeError(f"module {n!r} cannot be adapted: {why}")
    if not matched:
        raise ValueError(f"no module matched target_modules={target_modules!r} (exclude_modules={exclude}); "
                         f"{candidate_summary(model)}")
    return matched


def check_materialized(targets: Iterable[tuple[str, nn.Module]], what: str) -> None:
    """Refuse targets whose weight has no data here: on the ``meta`` device (accelerate's CPU / disk offload:
    ``device_map`` entries ``"cpu"`` / ``"disk"`` beside GPUs, ``cpu_offload``, keeps weights there and loads them
    only inside the module's forward), or partitioned by DeepSpeed ZeRO-3 (each rank holds a flat shard, of shape
    ``(0,)`` outside a gather). An adapter is built from the weight itself."""
    targets = list(targets)
    # ZeRO-3 marks every parameter it partitions with ds_id (deepspeed/runtime/zero/partition_parameters.py);
    # read as an attribute so that deepspeed is never imported here.
    zero3 = [n for n, m in targets if getattr(getattr(m, "weight", None), "ds_id", None) is not None]
    if zero3:
        more = f" (and {len(zero3) - 1} more)" if len(zero3) > 1 else ""
        raise ValueError(f"{what}: the weight of {zero3[0]!r}{more} is partitioned by DeepSpeed ZeRO-3 (the model "
                         "was built under deepspeed.zero.Init, e.g. from_pretrained while a ZeRO-3 TrainingArguments "
                         "or HfDeepSpeedConfig exists); adapters are built from whole weights: load the model "
                         f"before creating the ZeRO-3 TrainingArguments, run {what} on it, then hand it to the "
                         "Trainer, whose DeepSpeed engine partitions the adapted model "
                         "(docs/tools.md#deepspeed-zero-3)")
    bases = ((n, base_weight(m)) for n, m in targets)
    offloaded = [n for n, base in bases if base is not None and base.device.type == "meta"]
    if offloaded:
        more = f" (and {len(offloaded) - 1} more)" if len(offloaded) > 1 else ""
        raise ValueError(f"{what}: the weight of {offloaded[0]!r}{more} is on the meta device (offloaded by "
                         "accelerate: a device_map with 'cpu' / 'disk' entries, or cpu_offload); adapters are built "
                         "from the weights: load the model with its targeted layers in memory (a device_map over "
                         "GPUs and the CPU without offload), or exclude those layers")
