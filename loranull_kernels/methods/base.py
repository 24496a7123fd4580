"""What a method is made of (docs/methods.md): an initialiser, a trainable set, an optional regulariser, an optional
sparsity schedule, and the configuration fields it owns. A method module declares all of it in one
:class:`Method`; :mod:`loranull_kernels.methods` registers the modules and :class:`~loranull_kernels.AdapterConfig`
reads the registry (names, defaults, field checks), so adding a method is one new module and one registration line.

The trainable set is ``lora_B`` always, ``lora_A`` unless ``AdapterConfig.freeze_A``, and ``rank_scale`` when the
initialiser returns one. Regularisers (``penalty(layer, config, name)``) and sparsity schedules
(``after_step(layer, step, config, name)``) run over a model through :func:`loranull_kernels.regularization_loss` /
:func:`loranull_kernels.after_optimizer_step`; a method brings its own by default and any config may name another
(``AdapterConfig.regularizer`` / ``sparsity``). Their state lives in buffers of the layer."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass
class AdapterInit:
    """An initialiser's result, in the float32/float64 dtype it computed in (the layer casts once, at the end).

    ``weight`` is the base to store (``W_base``); it is the input W itself for methods that keep the base.
    The invariant "output unchanged at init" is ``weight + scaling · B0 diag(d0) A0 == W`` for the methods that
    promise it.

    ``base_A`` / ``base_B``: for base-rewriting methods whose removed part is not the initial adapter (KaSA drops
    W's smallest singular components and starts the adapter elsewhere), the factors with
    ``weight + scaling · base_B base_A == W``; the layer keeps them as ``lora_A0`` / ``lora_B0``. None: the initial
    adapter is that part (pissa, milora, lora_null).
    """

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    weight: torch.Tensor  # (out, in)
    rank_scale: Optional[torch.Tensor] = None  # (r,)
    base_A: Optional[torch.Tensor] = None  # (r, in)
    base_B: Optional[torch.Tensor] = None  # (out, r)


Initializer = Callable[..., AdapterInit]


def check_init(method: str, init, weight: torch.Tensor, r: int) -> None:
    """ValueError naming the method and the tensor unless ``init`` is an :class:`AdapterInit` whose tensors have the
    shapes the layer needs for a weight ``(out, in)`` and rank r (a wrong one would fail later in a bare copy)."""
    if not isinstance(init, AdapterInit):
        raise TypeError(f"method {method!r}: the initialiser returned {type(init).__name__}, not an AdapterInit")
    out_f, in_f = weight.shape
    expected = {"lora_A": (r, in_f), "lora_B": (out_f, r), "weight": (out_f, in_f), "rank_scale": (r,),
                "base_A": (r, in_f), "base_B": (out_f, r)}
    for field, shape in expected.items():
        t = getattr(init, field)
        if t is None and field in ("rank_scale", "base_A", "base_B"):
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"method {method!r}: the initialiser's {field} is "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}, not a float tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"method {method!r}: the initialiser returned {field} of shape {tuple(t.shape)}, expected "
                             f"{shape} (r={r}, in={in_f}, out={out_f})")
    if (init.base_A is None) != (init.base_B is None):
        raise ValueError(f"method {method!r}: the initialiser returned only one of base_A / base_B")


# ------------------------------------------------------------------------------------------ configuration fields
def is_real(v) -> bool:
    """A finite int or float (not a bool: ``True`` is an int to Python, never a number to a user)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def survives_json(v) -> bool:
    """Whether ``v`` comes back from the adapter file's JSON as itself (a tuple comes back a list, a dict's int keys
    as strings, a numpy scalar not at all)."""
    try:
        back = json.loads(json.dumps(v))
    except (TypeError, ValueError):
        return False
    return type(back) is type(v) and back == v


@dataclass(frozen=True)
class Option:
    """One :class:`~loranull_kernels.AdapterConfig` field a method owns (``kasa_beta``, ``rose_keep``, ...).

    ``valid(value)`` says whether a value is acceptable on its own; a bad one is refused with
    ``"AdapterConfig.<name> must be <expected>, got <value>"`` (``TypeError`` when ``type_error``: a bool field given
    a string would silently mean its opposite). Checks across fields belong to :attr:`Method.check_config`.
    """

    name: str
    default: Any
    valid: Callable[[Any], bool]
    expected: str
    type_error: bool = False

    def check(self, value) -> None:
        if not self.valid(value):
            raise (TypeError if self.type_error else ValueError)(
                f"AdapterConfig.{self.name} must be {self.expected}, got {value!r}")


def choice(name: str, default: str, choices: tuple[str, ...]) -> Option:
    """An option taking one of a few strings."""
    return Option(name, default, lambda v: v in choices, " or ".join(repr(c) for c in choices))


def nonnegative_real(name: str, default: float) -> Option:
    return Option(name, default, lambda v: is_real(v) and v >= 0, "a finite number ≥ 0")


def nonnegative_int(name: str, default: int) -> Option:
    return Option(name, default, lambda v: is_int(v) and v >= 0, "an int ≥ 0")


def flag(name: str, default: bool) -> Option:
    return Option(name, default, lambda v: isinstance(v, bool), "a bool", type_error=True)


# ------------------------------------------------------------------------------------------- pieces and methods
@dataclass(frozen=True)
class Regularizer:
    """A loss term per layer. ``penalty(layer, config, module_name) -> 0-dim tensor``; ``averaged(config)``: True
    when the model-level loss divides the sum of this regulariser's terms by the number of layers using it.
    ``state_prefix``: its state buffers on the layer are named ``<state_prefix>*`` (None: it has no state)."""

    name: str
    penalty: Callable[..., torch.Tensor]
    averaged: Callable[[Any], bool] = lambda config: False
    state_prefix: Optional[str] = None  # the names of its state buffers on the layer (saved with the adapter)


@dataclass(frozen=True)
class SparsitySchedule:
    """A per-layer update after every optimiser step. ``attach(layer, config)`` registers its state buffers when
    the layer is built; ``after_step(layer, step, config, module_name) -> keep fraction``."""

    name: str
    attach: Callable[..., None]
    after_step: Callable[..., float]
    state_prefix: Optional[str] = None  # the names of its state buffers on the layer (saved with the adapter)


@dataclass(frozen=True)
class Method:
    """Everything the package knows about one method, declared once in the method's module.

    ``initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit`` receives W as
    float32 (float64 for float64 models) and, for calibrated methods, the layer's input covariance (in, in).

    Attributes:
        needs_calibration: the initialiser needs the layer's input covariance (``inject(calibration_data=...)``).
        rewrites_base: ``W_base = W − s·B0A0 ≠ W`` (merge / convert / save must know B0, A0).
        regularizer, sparsity: the pieces the method brings when the config leaves them at ``"auto"``; also the
            pieces any other method can name. None: it brings none.
        options: the config fields the method (and its pieces) own, with defaults and checks.
        check_config(config): checks across fields (raise ``ValueError`` naming the field).
        check_layer(config, in_features, out_features): why a layer of this shape cannot take the adapter
            (None if it can), beyond ``r ≤ min(in, out)``, as a clause the caller completes with the layer's name
            (``"AdapterConfig.null_dim=20 exceeds in_features=16"`` + ``" of layer 'q_proj' ..."``); checked for
            every target before anything changes.
        solve_calibration(covariances, config, dtype): for calibrated methods, an optional batched pre-solve of
            a group of layers' covariances; returns ``(solved, note)`` for
            :class:`~loranull_kernels.nullspace.precomputed` and the progress output.
        base_unchanged(config): for a base-rewriting method, True when this config leaves the base untouched
            (the returned ``weight`` is W itself), so a quantized base is kept as it is (:meth:`rewrites_base_for`).
    """

    name: str
    initialize: Initializer
    needs_calibration: bool = False
    rewrites_base: bool = False
    regularizer: Optional[Regularizer] = None
    sparsity: Optional[SparsitySchedule] = None
    options: tuple[Option, ...] = ()
    check_config: Optional[Callable[[Any], None]] = None
    check_layer: Optional[Callable[[Any, int, int], Optional[str]]] = None
    solve_calibration: Optional[Callable[..., tuple[list, str]]] = None
    base_unchanged: Optional[Callable[[Any], bool]] = None

    def rewrites_base_for(self, config) -> bool:
        """Whether the initialiser changes the base under ``config`` (:attr:`rewrites_base`, unless
        :attr:`base_unchanged` says this config leaves it as it is: LoRA-Null's ``init="basis"``). A quantized
        base must then be re-quantized."""
        return self.rewrites_base and not (self.base_unchanged is not None and self.base_unchanged(config))


def split_singular(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float):
    """``B0 = U √(S/s)``, ``A0 = √(S/s) Vh``: the factors whose scaled product s·B0A0 is U diag(S) Vh."""
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root[None, :]
