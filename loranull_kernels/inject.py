"""Put adapters into a model: replace its targeted linear layers by :class:`~loranull_kernels.nn.LoRALinear`."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from ._dtypes import compute_dtype
from .config import AdapterConfig
from .methods import get_method
from .nn import LoRALinear
from .base_weights import base_weight, prepare
from .rollback import Rollback
from .targets import check_materialized, find_targets, is_conv1d, linear_shape


def _check_fresh(model: nn.Module) -> None:
    existing = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if existing:
        raise ValueError(f"the model already has adapters ({len(existing)} LoRALinear, e.g. {existing[0]!r}); "
                         "inject into the original model, or use load_adapter to replace their weights")


def _check_ranks(targets: list[tuple[str, nn.Module]], config: AdapterConfig) -> None:
    """r, and the method's own shape constraints (LoRA-Null's null_dim), against every target's shape, before
    calibration or any layer is replaced."""
    r = config.r
    too_small = [(n, linear_shape(m)) for n, m in targets if r > min(linear_shape(m))]
    if too_small:
        name, (i, o) = too_small[0]
        more = f" (and {len(too_small) - 1} more)" if len(too_small) > 1 else ""
        raise ValueError(f"AdapterConfig.r={r} exceeds min(in_features, out_features) = {min(i, o)} of layer "
                         f"{name!r} (in={i}, out={o}){more}: lower r or exclude the layer")
    method = get_method(config.method)
    if method.rewrites_base_for(config) and config.quantized_rewrite == "requantize":
        refused = [(n, why) for n, m in targets for why in [base_weight(m).requantize_refusal()] if why]
        if refused:
            name, why = refused[0]
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise ValueError(f"AdapterConfig.quantized_rewrite='requantize' with method {config.method!r}, but for "
                             f"layer {name!r}{more} {why}: use quantized_rewrite='low_rank', or exclude those layers")
    check = method.check_layer
    refused = [(n, linear_shape(m), why) for n, m in targets if check
               for why in [check(config, *linear_shape(m))] if why]
    if refused:
        name, (i, o), why = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ValueError(f"{why} of layer {name!r} (in={i}, out={o}){more}: change the config or exclude the layer")


def replace_targets(model: nn.Module, targets: Iterable[tuple[str, nn.Module]],
                    make_layer: Callable[[str, nn.Module], LoRALinear], freeze: bool = True,
                    rollback: Rollback | None = None) -> nn.Module:
    """Freeze every parameter of ``model`` (unless ``freeze=False``), then swap each ``(name, module)`` target for
    ``make_layer(name, module)``. Layers that came from a Conv1D get ``fan_in_fan_out = True`` (PEFT's name for
    that layout) so exports can say so.

    Layers are built and swapped one at a time. With ``rollback``, each swap is recorded there (the replaced module
    is kept until the edit succeeds, see :mod:`loranull_kernels.rollback`); without, it is freed at once."""
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in targets:
        layer = make_layer(name, module)
        layer.fan_in_fan_out = is_conv1d(module)
        if getattr(module, "training", True) != layer.training:
            layer.train(module.training)
        if rollback is not None:
            rollback.swap(name, layer)
        else:
            model.set_submodule(name, layer)
    return model


def _calibrate_and_replace(model, config, targets, data, make_layer, covariances, mode, offload, kwargs,
                           rollback: Rollback) -> None:
    """Calibrate (one pass or block by block) and swap each group of targets as soon as its covariances are known."""
    from . import calibration_memory
    from .calibrate import calibrate_groups
    from .nullspace import precomputed

    kwargs.setdefault("normalize", config.normalize_calibration)
    frozen = []
    solve = get_method(config.method).solve_calibration

    def adapt(group_name: str, group: list, covs: dict) -> str | None:
        if not frozen:  # once, before the first adapter exists (later calls must not freeze earlier adapters)
            for p in model.parameters():
                p.requires_grad_(False)
            frozen.append(True)
        note = None
        solved = []
        if solve is not None:  # one batched solve for the whole group (LoRA-Null's null spaces)
            dtype = max((compute_dtype(base_weight(m).dtype) for _, m in group), key=lambda d: d.itemsize)
            solved, note = solve(covs.values(), config, dtype)
        covariances.update(covs)
        with precomputed(solved):
            replace_targets(model, group, make_layer, freeze=False, rollback=rollback)
        done = {name for name, _ in group}
        for name in done:  # the adapters hold what they need: free the group's covariances now
            covariances.pop(name, None)
        # ... and drop these lists' references to the replaced layers (the rollback keeps its own while it needs
        # them): without a rollback, every block's old weights would otherwise stay alive until inject returns
        targets[:] = [t for t in targets if t[0] not in done]
        group.clear()
        return note

    calibrate_groups(model, targets, data, adapt, calibration_mode=mode, offload=offload,
                     before=lambda per_block, outside: calibration_memory.check(targets, per_block, outside), **kwargs)


# What inject passes on to the calibration; AdapterConfig.normalize_calibration sets its `normalize`.
CALIBRATION_OPTIONS = ("progress", "max_batches")


def _check_calibration_options(config: AdapterConfig, calibration_data, calibration_mode: str, offload,
                               calibrate_kwargs: dict) -> None:
    """Refuse unknown calibration options; warn about options a method that does not calibrate ignores."""
    from .calibrate import check_data
    from .calibrate_one_pass import check_max_batches
    from .calibrate_sequential import check_options

    check_options(calibration_mode, offload)
    if "normalize" in calibrate_kwargs:
        raise TypeError("inject got normalize=...; set AdapterConfig(normalize_calibration=...) instead (it is saved "
                        "with the adapter)")
    unknown = sorted(set(calibrate_kwargs) - set(CALIBRATION_OPTIONS))
    if unknown:
        raise TypeError(f"inject got unknown keyword argument(s) {unknown}; the calibration options are "
                        f"calibration_mode, offload, {', '.join(CALIBRATION_OPTIONS)}")
    check_max_batches(calibrate_kwargs.get("max_batches"))
    if config.needs_calibration:
        if calibration_data is None:
            raise ValueError(f"method {config.method!r} needs activation statistics: pass calibration_data "
                             "(an iterable of batches) to inject")
        check_data(calibration_data, "calibration_data")
        return
    ignored = (["calibration_data"] if calibration_data is not None else []) + \
        (["calibration_mode"] if calibration_mode != "auto" else []) + (["offload"] if offload is not None else []) + \
        (["max_batches"] if calibrate_kwargs.get("max_batches") is not None else [])
    if ignored:  # (progress is display only: code that injects any method may well pass progress=False)
        warnings.warn(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored: method "
                      f"{config.method!r} does not use activation statistics", stacklevel=3)


def rollback_bytes(targets: list[tuple[str, nn.Module]], config: AdapterConfig) -> dict[torch.device, int]:
    """Bytes per device that keeping the replaced layers for a rollback holds beyond what the new layers share with
    them: a dense weight the adapter copies (a method that rewrites the base; Conv1D's transposed layout) and a
    re-quantized base's old module. A base the adapter keeps (LoRA on an ``nn.Linear``, every quantized base with
    ``quantized_rewrite="low_rank"``) is shared, not copied: it costs nothing."""
    rewrites = get_method(config.method).rewrites_base_for(config)
    need: dict[torch.device, int] = {}
    for _, module in targets:
        base = base_weight(module)
        if base.quantized_format is not None:
            kept = base.nbytes() if rewrites and config.quantized_rewrite == "requantize" else 0
        else:
            kept = base.nbytes() if rewrites or not isinstance(module, nn.Linear) else 0
        if kept:
            need[base.device] = need.get(base.device, 0) + kept
    return need


def _transactional(transactional, targets, config, who: str = "inject") -> bool:
    """Resolve ``inject``'s (or ``load_adapter``'s, ``who``) ``transactional``: "auto" keeps the replaced layers for a
    rollback unless they would take more than half of a device's free memory (then it warns and frees each at
    once)."""
    if transactional != "auto":
        return transactional
    from .calibration_memory import free_bytes

    for device, need in rollback_bytes(targets, config).items():
        free = free_bytes(device)
        if free is not None and need > free // 2:
            warnings.warn(f"{who} is not transactional here: keeping the {need / 2**30:.2f} GiB of replaced weights "
                          f"on {device} for a rollback would take more than half of its {free / 2**30:.2f} GiB free; "
                          "a failure part-way will leave the layers before it adapted (pass transactional=True to "
                          "insist, or False to choose this without the warning)", stacklevel=3)
            return False
    return True


def inject(model: nn.Module, config: AdapterConfig, calibration_data=None, *, penalty_hooks: bool = True,
           calibration_mode: str = "auto", offload: str | None = None, transactional: bool | str = "auto",
           **calibrate_kwargs) -> nn.Module:
    """Replace the targeted linear layers of ``model`` by adapters, in place, and freeze everything else.

    Targets follow ``config.target_modules`` / ``config.exclude_modules`` (see
    :func:`loranull_kernels.targets.find_targets`: suffixes, a ``re.fullmatch`` regex, or ``"all-linear"`` = every
    nn.Linear / Conv1D except the output head: the module ``get_output_embeddings()`` returns, linears tied to an
    input embedding, and anything named or inside ``lm_head`` / ``score`` / ``classifier`` / ``qa_outputs``).
    GPT-2's ``Conv1D`` is supported: it becomes a LoRALinear with the transposed (out, in) weight.

    Each adapter is ``LoRALinear.from_base(module, config=config, covariance=C)`` on the layer's own device and
    dtype. Quantized bases (bitsandbytes ``load_in_4bit`` / ``load_in_8bit``, torchao) stay quantized
    (:class:`~loranull_kernels.nn.QuantizedLoRALinear`; for methods that rewrite the base, ``config.quantized_rewrite``
    chooses: ``"low_rank"``, the default, keeps the loaded weight and carries ``−s·B0A0`` frozen beside the adapter;
    ``"requantize"`` re-quantizes the residual with each layer's own settings), and bitsandbytes' CPU repacking of
    4-bit weights is switched off on the targets before calibration runs the model (docs/design.md#quantized-bases).
    Methods that need activation statistics (``config.needs_calibration``, e.g. ``lora_null``) first run
    :func:`loranull_kernels.calibrate` over ``calibration_data`` with ``normalize=config.normalize_calibration``
    and ``**calibrate_kwargs`` (``progress``, ``max_batches``). With ``config.init_seed`` set, one generator seeded
    with it draws every layer's random init in module order: reproducible, and different from layer to layer.

    Calibration modes (``calibration_mode``): ``"sequential"`` calibrates block by block
    (:mod:`loranull_kernels.calibrate_sequential`): the inputs of the model's block stack (found generically: an
    ``nn.ModuleList`` of same-class blocks) are captured once, each block then runs alone, its covariances become
    its adapters (same-shape null spaces solved in one batched call, shared inputs solved once) and are freed
    before the next block: one block's covariances in memory instead of the whole model's, and the same adapters up
    to float32 rounding. ``offload="cpu"`` keeps the calibration set's hidden states on the CPU. ``"one_pass"``:
    every covariance at once. ``"auto"`` (default): sequential whenever a block stack holds targeted layers and the
    model's forward runs it as a plain chain (each block once, in order, on the previous block's output: checked on
    the first batch), else one pass with a warning; ``"sequential"`` refuses such a model. A one-shot iterator
    (a generator) is read into a list first when calibrating block by block, which reads the data more than once.
    The progress output (``progress=True``) shows each block and which null-space solver ``"auto"`` picked. Before
    any work, the covariances' memory is estimated and a :class:`~loranull_kernels.calibration_memory.CalibrationMemoryError`
    (a MemoryError) raised, with the way out, when a device cannot hold them. Calibration options given to a
    method that does not calibrate are ignored with a warning.

    ``penalty_hooks`` (default True): the regularisers' gradients (KaSA, LaLoRA) are added at every optimiser step
    by :func:`loranull_kernels.regularize.enable_penalty_hooks`, so no loss code is needed; False leaves them to
    ``loss + lk.regularization_loss(model)``.

    Returns:
        ``model`` itself. Trainable afterwards: ``lora_A`` (unless ``freeze_A``), ``lora_B``, ``rank_scale`` (when
        the method has one) and the targeted biases with ``train_bias``.

    Raises:
        ValueError: no module matched (candidates listed), r larger than some targeted layer (named), missing
            calibration data for a calibrated method, a bad calibration_mode / offload / max_batches, or a model
            that already holds adapters.
        TypeError: ``config`` is not an AdapterConfig, an explicitly targeted module is not linear, an unknown
            keyword argument, or calibration data that is a single batch rather than an iterable of batches.
        CalibrationMemoryError: the covariances held at once would exceed a device's free memory.

    These are all raised before the model is touched. ``inject`` is transactional (:mod:`loranull_kernels.rollback`):
    any failure afterwards (non-finite activations in a later block, an initialiser's error, ``KeyboardInterrupt``...)
    puts back every replaced module, every parameter's ``requires_grad`` and every module's train/eval mode, and
    leaves the penalty hooks as they were, before the exception propagates; the same model can then be injected
    again. For that, the replaced layers are kept until ``inject`` returns. A base the adapter keeps is shared with
    it, not copied (LoRA, RoseLoRA, LaLoRA, LoRA-Null's basis init on ``nn.Linear``; every quantized base with
    ``quantized_rewrite="low_rank"``): keeping its module costs nothing. A base the method rewrites (pissa, milora,
    kasa, LoRA-Null's default svd init on dense layers) is copied, so keeping the old one grows the peak memory by
    those layers' weights (:func:`rollback_bytes`). ``transactional="auto"`` (default) keeps them unless that would
    take more than half of a device's free memory, and then warns; ``True`` always keeps them; ``False`` frees each
    replaced layer at once (block by block, memory stays flat in the number of blocks), and a failure after the
    first layer was replaced then leaves the layers before it adapted and every parameter frozen: start again from
    a fresh copy of the model.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    config.validate()
    _check_fresh(model)
    if not isinstance(penalty_hooks, bool):  # "no" is truthy: a string here would mean its opposite
        raise TypeError(f"penalty_hooks must be a bool, got {penalty_hooks!r}")
    if not (isinstance(transactional, bool) or transactional == "auto"):
        raise TypeError(f"transactional must be a bool or 'auto', got {transactional!r}")
    _check_calibration_options(config, calibration_data, calibration_mode, offload, calibrate_kwargs)
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    _check_ranks(targets, config)
    check_materialized(targets, "inject")
    prepare(m for _, m in targets)
    transactional = _transactional(transactional, targets, config)
    generators: dict[torch.device, torch.Generator] = {}

    def make_layer(name: str, module: nn.Module) -> LoRALinear:
        # Checked here, on the dense view the initialiser gets: a NaN / Inf weight would give NaN factors silently
        # (LAPACK's SVD does not raise on them).
        if not bool(torch.isfinite(base_weight(module).dense()).all()):
            raise ValueError(f"layer {name!r} has NaN or Inf weights: no adapter can be initialised on it")
        gen = None
        if config.init_seed is not None:
            dev = base_weight(module).device
            if dev not in generators:
                generators[dev] = torch.Generator(device=dev).manual_seed(config.init_seed)
            gen = generators[dev]
        return LoRALinear.from_base(module, config=config, covariance=covariances.get(name), generator=gen,
                                    share_base=True)

    covariances: dict[str, torch.Tensor] = {}
    with Rollback(model, enabled=transactional) as rollback:  # any failure below, Ctrl-C included, is undone
        if not config.needs_calibration:
            replace_targets(model, targets, make_layer, rollback=rollback)
        else:
            _calibrate_and_replace(model, config, targets, calibration_data, make_layer, covariances,
                                   calibration_mode, offload, calibrate_kwargs, rollback)
        if penalty_hooks:
            from .regularize import enable_penalty_hooks

            enable_penalty_hooks(model)
    return model


class TrainableParameters(NamedTuple):
    trainable: int
    total: int
    percent: float


def print_trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Print and return ``(trainable, total, percent)`` parameter counts (shared/tied parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():  # nn.Module.parameters() already yields a shared Parameter once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
    return TrainableParameters(trainable, total, percent)
