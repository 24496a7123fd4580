"""``AdapterConfig``: everything that defines an adapter, serialisable to JSON next to its weights.

A method is four orthogonal pieces (docs/methods.md): an initialiser, a trainable set, an optional regulariser and an
optional sparsity schedule. ``method`` names the initialiser (and the pieces that come with it by default);
``freeze_A`` chooses the trainable set for any initialiser (LoRA-Null v2 is ``method="lora_null", freeze_A=True``);
``regularizer`` and ``sparsity`` choose the other two pieces. Their default ``"auto"`` takes the method's own:
``"kasa"`` → KaSA init + regularizer ``"kasa"``; ``"roselora"`` → LoRA init + sparsity ``"roselora"``; ``"lalora"`` →
LoRA init + regularizer ``"lalora"``; every other method → none. Naming a piece composes it with any initialiser
(``AdapterConfig(method="lora_null", regularizer="lalora")``, ``AdapterConfig(method="milora", sparsity="roselora")``);
``None`` switches the method's default piece off.

The method names, pieces and method-specific fields (``null_dim``, ``kasa_beta``, ``rose_keep``, ...) are not listed
here: each method declares its own in its module, and this class reads them from the registry
(:mod:`loranull_kernels.methods`).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .methods import METHODS, OPTIONS, REGULARIZERS, RESERVED, SPARSITY, get_method
from .methods.base import is_int, is_real, survives_json


#: The values of :attr:`AdapterConfig.quantized_rewrite`.
QUANTIZED_REWRITES = ("low_rank", "requantize")


def adapter_scaling(r: int, alpha: float | None, use_rslora: bool) -> float:
    """The adapter scale s: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; alpha None means r."""
    a = float(r if alpha is None else alpha)
    return a / math.sqrt(r) if use_rslora else a / r


def check_exclude_modules(value, name: str = "exclude_modules") -> None:
    """``exclude_modules`` must be a list (or tuple) of non-empty module-name suffixes. A bare string is refused:
    iterated, it would exclude single characters, i.e. nothing."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of module-name suffixes, got the string {value!r} "
                        f"(did you mean [{value!r}]?)")
    if not (isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value)):
        raise TypeError(f"{name} must be a list of non-empty module-name suffixes, got {value!r}")


@dataclass(init=False)
class AdapterConfig:
    """Configuration of the adapters :func:`loranull_kernels.inject` puts into a model.

    Attributes:
        method: the initialiser, a name of :data:`loranull_kernels.methods.METHODS`: ``"lora"``, ``"pissa"``,
            ``"milora"``, ``"lora_null"``, ``"kasa"`` (SVD-truncated base, trainable ``rank_scale``),
            ``"roselora"`` / ``"lalora"`` (LoRA's init; they bring their piece).
        r: adapter rank (≥ 1, ≤ min(in, out) of every targeted layer).
        alpha: scaling numerator; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). None: alpha = r.
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: module-name suffixes to adapt (``["q_proj", "v_proj"]``), a single regular expression
            matched against full module names with ``re.fullmatch``, or ``"all-linear"`` (every nn.Linear but the
            output head).
        exclude_modules: module-name suffixes never adapted (applied after ``target_modules``).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        train_bias: train the targeted layers' biases too.
        freeze_A: train B only (no dA is ever computed); LoRA-Null v2 with ``method="lora_null"``.
        init_seed: seed of the random initialisations (LoRA's kaiming A); None uses torch's global generator.
        quantized_rewrite: how a method that rewrites the base (pissa, milora, kasa, lora_null with
            ``init="svd"``) treats a quantized base (bitsandbytes, torchao; dense bases ignore it):
            ``"low_rank"`` (default) keeps the quantized weight as loaded and carries ``−s·B0A0`` frozen beside the
            adapter in the fused op (rank 2r there): the output is exactly unchanged at init;
            ``"requantize"`` stores ``Q(W − s·B0A0)`` re-quantized with the layer's own settings (PiSSA's QLoRA
            recipe): the output moves at init by that residual's quantization error (reported per layer).
            docs/design.md#quantized-bases.
        regularizer: the loss term :func:`loranull_kernels.regularization_loss` adds: a name of
            :data:`~loranull_kernels.methods.REGULARIZERS` (``"kasa"``, ``"lalora"``), None, or ``"auto"`` (the
            method's own: see the module docstring; :attr:`effective_regularizer`).
        sparsity: the schedule :func:`loranull_kernels.after_optimizer_step` applies: ``"roselora"``, None or
            ``"auto"`` (:attr:`effective_sparsity`).
        options: every method-specific field by name, defaults filled in. Read and write them as attributes
            (``config.null_dim``) and pass them as keywords (``AdapterConfig(method="kasa", kasa_beta=1e-3)``); each
            is documented with its method (docs/methods.md#configuration-fields):
            LoRA-Null ``null_dim``, ``lora_null_init``, ``normalize_calibration``; PiSSA ``pissa_oversample``,
            ``pissa_n_iter``; KaSA ``kasa_beta``, ``kasa_gamma``, ``kasa_truncation``, ``kasa_regularizer_form``;
            RoseLoRA ``rose_keep``, ``rose_t_init``, ``rose_t_final``, ``rose_ema``, ``rose_clamp``; LaLoRA
            ``lalora_lambda``, ``lalora_prior_precision``, ``lalora_curvature``, ``lalora_kfac_rank``.
    """

    method: str = "lora"
    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False
    train_bias: bool = False
    freeze_A: bool = False
    init_seed: int | None = None
    quantized_rewrite: str = "low_rank"
    regularizer: str | None = "auto"
    sparsity: str | None = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, method: str = "lora", r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 target_modules: list[str] | str = "all-linear", exclude_modules: list[str] | None = None,
                 use_rslora: bool = False, train_bias: bool = False, freeze_A: bool = False, *,
                 init_seed: int | None = None, quantized_rewrite: str = "low_rank", regularizer: str | None = "auto",
                 sparsity: str | None = "auto", options: dict[str, Any] | None = None, **method_options):
        given = {**(options or {}), **method_options}
        unknown = sorted(set(given) - set(OPTIONS))
        if unknown:
            raise TypeError(f"AdapterConfig got unknown field(s) {unknown}; the methods' fields are {sorted(OPTIONS)}")
        self.method, self.r, self.alpha, self.dropout = method, r, alpha, dropout
        self.target_modules = target_modules
        self.exclude_modules = [] if exclude_modules is None else exclude_modules
        self.use_rslora, self.train_bias, self.freeze_A = use_rslora, train_bias, freeze_A
        self.init_seed, self.regularizer, self.sparsity = init_seed, regularizer, sparsity
        self.quantized_rewrite = quantized_rewrite
        self.options = {name: given.get(name, opt.default) for name, opt in OPTIONS.items()}
        self.validate()

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: the method-specific fields, read from ``options``.
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"'AdapterConfig' object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in OPTIONS:
            self.options[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def scaling(self) -> float:
        return adapter_scaling(self.r, self.alpha, self.use_rslora)

    @property
    def effective_regularizer(self) -> str | None:
        """The regulariser in force: ``regularizer``, or the method's own when it is ``"auto"``."""
        return self._piece_in_force("regularizer")

    @property
    def effective_sparsity(self) -> str | None:
        """The sparsity schedule in force: ``sparsity``, or the method's own when it is ``"auto"``."""
        return self._piece_in_force("sparsity")

    def _piece_in_force(self, kind: str) -> str | None:
        chosen = getattr(self, kind)
        if chosen != "auto":
            return chosen
        own = getattr(get_method(self.method), kind)
        return None if own is None else own.name

    @property
    def needs_calibration(self) -> bool:
        return get_method(self.method).needs_calibration

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the offending field."""
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"AdapterConfig.method={self.method!r} is unknown; choose one of {tuple(METHODS)}")
        if not is_int(self.r) or self.r < 1:
            raise ValueError(f"AdapterConfig.r must be a positive int, got {self.r!r}")
        if self.alpha is not None and not is_real(self.alpha):
            raise ValueError(f"AdapterConfig.alpha must be a finite number or None, got {self.alpha!r}")
        if not is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("use_rslora", "train_bias", "freeze_A"):
            if not isinstance(getattr(self, name), bool):  # "no" is truthy: a string here would mean its opposite
                raise TypeError(f"AdapterConfig.{name} must be a bool, got {getattr(self, name)!r}")
        self._validate_targets()
        if self.init_seed is not None and (not is_int(self.init_seed)
                                           or not -(2**63) <= self.init_seed < 2**64):
            raise ValueError("AdapterConfig.init_seed must be None or an int in [-2**63, 2**64) (torch.manual_seed's "
                             f"range), got {self.init_seed!r}")
        if self.quantized_rewrite not in QUANTIZED_REWRITES:
            raise ValueError(f"AdapterConfig.quantized_rewrite must be one of {QUANTIZED_REWRITES}, got "
                             f"{self.quantized_rewrite!r}")
        if self.regularizer not in ("auto", None, *REGULARIZERS):
            raise ValueError(f"AdapterConfig.regularizer={self.regularizer!r} is unknown; choose one of "
                             f"{tuple(REGULARIZERS)}, None or 'auto'")
        if self.sparsity not in ("auto", None, *SPARSITY):
            raise ValueError(f"AdapterConfig.sparsity={self.sparsity!r} is unknown; choose one of "
                             f"{tuple(SPARSITY)}, None or 'auto'")
        for name, opt in OPTIONS.items():
            opt.check(self.options[name])
            if not survives_json(self.options[name]):  # saved in the adapter file, it would not load back
                raise ValueError(f"AdapterConfig.{name}={self.options[name]!r} does not come back from JSON as itself "
                                 "(adapter files keep the config as JSON); use a list instead of a tuple, str keys")
        for m in METHODS.values():  # every method's cross-field checks: its fields may serve another initialiser
            if m.check_config is not None:
                m.check_config(self)

    def _validate_targets(self) -> None:
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("AdapterConfig.target_modules is an empty string; give module-name suffixes, a "
                                 "regular expression or 'all-linear'")
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    raise ValueError(f"AdapterConfig.target_modules={self.target_modules!r} is taken as a regular "
                                     f"expression and does not compile: {e}") from None
        elif not (isinstance(self.target_modules, (list, tuple)) and self.target_modules
                  and all(isinstance(t, str) and t for t in self.target_modules)):
            raise ValueError("AdapterConfig.target_modules must be a non-empty list of module-name suffixes, "
                             f"a regular expression or 'all-linear', got {self.target_modules!r}")
        check_exclude_modules(self.exclude_modules, "AdapterConfig.exclude_modules")

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, the method-specific ones flat beside the others (the adapter file's format)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "options"}
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return {**d, **copy.deepcopy(self.options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(d, dict):
            raise ValueError(f"an AdapterConfig is read from a dict of its fields, got {type(d).__name__}")
        if d.get("method", "lora") not in METHODS:  # its own fields would otherwise be reported as unknown ones
            raise ValueError(f"AdapterConfig.method={d.get('method')!r} is not a registered method (registered: "
                             f"{sorted(METHODS)}); register it (lk.methods.register) before reading this config")
        known = {f.name for f in fields(cls) if f.name != "options"} | set(OPTIONS)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AdapterConfig field(s) {sorted(unknown)} (written by a newer version?)")
        return cls(**d)


# An option may not take any of these names (see methods.RESERVED).
RESERVED.update({f.name for f in fields(AdapterConfig)} | {n for n in dir(AdapterConfig) if not n.startswith("__")})
