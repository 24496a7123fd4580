"""``AdapterConfig``: everything that defines an adapter, serialisable to JSON next to its weights.

A method is four orthogonal pieces (docs/methods.md): an initialiser, a trainable set, an optional regulariser and an
optional sparsity schedule. ``method`` names the initialiser (and the pieces that come with it by default);
``freeze_A`` chooses the trainable set for any initialiser (LoRA-Null v2 is ``method="lora_null", freeze_A=True``);
``regularizer`` and ``sparsity`` choose the other two pieces. Their default ``"auto"`` takes the method's own:
``"kasa"`` → KaSA init + regularizer ``"kasa"``; ``"roselora"`` → LoRA init + sparsity ``"roselora"``; ``"lalora"`` →
LoRA init + regularizer ``"lalora"``; every other method → none. Naming a piece composes it with any initialiser
(``AdapterConfig(method="lora_null", regularizer="lalora")``, ``AdapterConfig(method="milora", sparsity="roselora")``);
``None`` switches the method's default piece off.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

METHOD_NAMES = ("lora", "pissa", "milora", "lora_null", "kasa", "roselora", "lalora")
REGULARIZER_NAMES = ("kasa", "lalora")
SPARSITY_NAMES = ("roselora",)
# The pieces each method brings when ``regularizer`` / ``sparsity`` are left at "auto".
_DEFAULT_REGULARIZER = {"kasa": "kasa", "lalora": "lalora"}
_DEFAULT_SPARSITY = {"roselora": "roselora"}


def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def check_exclude_modules(value, name: str = "exclude_modules") -> None:
    """``exclude_modules`` must be a list (or tuple) of non-empty module-name suffixes. A bare string is refused:
    iterated, it would exclude single characters, i.e. nothing."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of module-name suffixes, got the string {value!r} "
                        f"(did you mean [{value!r}]?)")
    if not (isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value)):
        raise TypeError(f"{name} must be a list of non-empty module-name suffixes, got {value!r}")


@dataclass
class AdapterConfig:
    """Configuration of the adapters :func:`loranull_kernels.inject` puts into a model.

    Attributes:
        method: the initialiser: ``"lora"``, ``"pissa"``, ``"milora"``, ``"lora_null"``, ``"kasa"`` (SVD-truncated
            base, trainable ``rank_scale``), ``"roselora"`` / ``"lalora"`` (LoRA's init; they bring their piece).
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
        null_dim: LoRA-Null: dimension of the activation null space Q (≥ r); None means r (the reference).
        lora_null_init: LoRA-Null: ``"svd"`` (reference default: the adapter is the top-r SVD of ``W Q Qᵀ`` and
            the base becomes ``W − s·B0A0``) or ``"basis"`` (``A0 = Qᵀ``, ``B0 = 0``, base unchanged; needs
            null_dim = r).
        normalize_calibration: divide each calibration sample's activations by ``|max x|`` before accumulating
            (an option of the LoRA-Null reference code; off by default).
        pissa_oversample, pissa_n_iter: randomized-SVD settings for PiSSA's top-r components.
        init_seed: seed of the random initialisations (LoRA's kaiming A); None uses torch's global generator.
        regularizer: the loss term :func:`loranull_kernels.regularization_loss` adds: ``"kasa"``, ``"lalora"``,
            None, or ``"auto"`` (the method's own: see the module docstring; :attr:`effective_regularizer`).
        sparsity: the schedule :func:`loranull_kernels.after_optimizer_step` applies: ``"roselora"``, None or
            ``"auto"`` (:attr:`effective_sparsity`).
        kasa_beta, kasa_gamma: KaSA's ``β Σ‖d‖² + γ Σ(‖AAᵀ − I‖_F + ‖BᵀB − I‖_F)`` weights (PEFT's defaults).
        kasa_truncation: KaSA's base truncation: ``"min"`` keeps the top ``min(in, out) − r`` singular components
            (PEFT); ``"in"`` keeps ``in − r`` (the reference code), which truncates fewer than r (none at all when
            ``out ≤ in − r``) on layers wider than tall.
        kasa_regularizer_form: ``"rr"``: the r × r Grams per layer, summed (PEFT); ``"reference"``: the reference
            code's ``‖AᵀA − I_in‖_F + ‖BBᵀ − I_out‖_F`` (evaluated from the r × r Grams), averaged over layers.
        rose_keep: RoseLoRA's final keep fraction τ ∈ (0, 1] per row of A and per column of B.
        rose_t_init, rose_t_final: the cubic schedule's start and end steps (τ_t = 1 before t_i, τ from t_f on).
        rose_ema: decay of the importance EMA ``Ī ← ema·Ī + (1 − ema)·|p ⊙ ∇p|``.
        rose_clamp: clamp A and B to ``±rose_clamp`` whenever masks are applied (the editing recipe's 3e-3); None off.
        lalora_lambda: LaLoRA's λ in ``(λ/2)(θ − θ0)ᵀΛ(θ − θ0)``.
        lalora_prior_precision: δ added to the curvature of every adapter entry (Λ = F + δ·I). At B0 = 0 (LoRA's
            init) A has zero curvature, so its whole penalty is ``(λδ/2)‖A − A0‖²``: a pull back to A0.
        lalora_curvature: ``"diag"`` (diagonal Fisher of A and B) or ``"kfac"`` (K-FAC for B, diagonal for A).
        lalora_kfac_rank: rank kept of K-FAC's output factor E[ggᵀ] (out × out is never formed).
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
    null_dim: int | None = None
    lora_null_init: str = "svd"
    normalize_calibration: bool = False
    pissa_oversample: int = 16
    pissa_n_iter: int = 4
    init_seed: int | None = None
    regularizer: str | None = "auto"
    sparsity: str | None = "auto"
    kasa_beta: float = 1e-4
    kasa_gamma: float = 1e-3
    kasa_truncation: str = "min"
    kasa_regularizer_form: str = "rr"
    rose_keep: float = 0.05
    rose_t_init: int = 3
    rose_t_final: int = 20
    rose_ema: float = 0.8
    rose_clamp: float | None = None
    lalora_lambda: float = 1.0
    lalora_prior_precision: float = 1e-3
    lalora_curvature: str = "diag"
    lalora_kfac_rank: int = 32

    def __post_init__(self):
        self.validate()

    @property
    def scaling(self) -> float:
        alpha = float(self.r if self.alpha is None else self.alpha)
        return alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r

    @property
    def effective_regularizer(self) -> str | None:
        """The regulariser in force: ``regularizer``, or the method's own when it is ``"auto"``."""
        if self.regularizer == "auto":
            return _DEFAULT_REGULARIZER.get(self.method)
        return self.regularizer

    @property
    def effective_sparsity(self) -> str | None:
        """The sparsity schedule in force: ``sparsity``, or the method's own when it is ``"auto"``."""
        if self.sparsity == "auto":
            return _DEFAULT_SPARSITY.get(self.method)
        return self.sparsity

    @property
    def needs_calibration(self) -> bool:
        from .methods import get_method

        return get_method(self.method).needs_calibration

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the offending field."""
        if not isinstance(self.method, str) or self.method not in METHOD_NAMES:
            raise ValueError(f"AdapterConfig.method={self.method!r} is unknown; choose one of {METHOD_NAMES}")
        if not _is_int(self.r) or self.r < 1:
            raise ValueError(f"AdapterConfig.r must be a positive int, got {self.r!r}")
        if self.alpha is not None and not _is_real(self.alpha):
            raise ValueError(f"AdapterConfig.alpha must be a finite number or None, got {self.alpha!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("use_rslora", "train_bias", "freeze_A", "normalize_calibration"):
            if not isinstance(getattr(self, name), bool):  # "no" is truthy: a string here would mean its opposite
                raise TypeError(f"AdapterConfig.{name} must be a bool, got {getattr(self, name)!r}")
        self._validate_targets()
        if self.null_dim is not None and (not _is_int(self.null_dim) or self.null_dim < self.r):
            raise ValueError(f"AdapterConfig.null_dim must be an int ≥ r={self.r} or None, got {self.null_dim!r}")
        if self.lora_null_init not in ("svd", "basis"):
            raise ValueError(f"AdapterConfig.lora_null_init must be 'svd' or 'basis', got {self.lora_null_init!r}")
        if self.lora_null_init == "basis" and self.null_dim not in (None, self.r):
            raise ValueError("AdapterConfig.lora_null_init='basis' (A0 = Qᵀ) needs null_dim = r")
        for name in ("pissa_oversample", "pissa_n_iter"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"AdapterConfig.{name} must be an int ≥ 0, got {getattr(self, name)!r}")
        if self.init_seed is not None and (not _is_int(self.init_seed)
                                           or not -(2**63) <= self.init_seed < 2**64):
            raise ValueError("AdapterConfig.init_seed must be None or an int in [-2**63, 2**64) (torch.manual_seed's "
                             f"range), got {self.init_seed!r}")
        self._validate_pieces()

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

    def _validate_pieces(self) -> None:
        if self.regularizer not in ("auto", None) + REGULARIZER_NAMES:
            raise ValueError(f"AdapterConfig.regularizer={self.regularizer!r} is unknown; choose one of "
                             f"{REGULARIZER_NAMES}, None or 'auto'")
        if self.sparsity not in ("auto", None) + SPARSITY_NAMES:
            raise ValueError(f"AdapterConfig.sparsity={self.sparsity!r} is unknown; choose one of "
                             f"{SPARSITY_NAMES}, None or 'auto'")
        for name in ("kasa_beta", "kasa_gamma", "lalora_lambda", "lalora_prior_precision"):
            if not _is_real(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"AdapterConfig.{name} must be a finite number ≥ 0, got {getattr(self, name)!r}")
        if self.kasa_truncation not in ("min", "in"):
            raise ValueError(f"AdapterConfig.kasa_truncation must be 'min' or 'in', got {self.kasa_truncation!r}")
        if self.kasa_regularizer_form not in ("rr", "reference"):
            raise ValueError("AdapterConfig.kasa_regularizer_form must be 'rr' or 'reference', "
                             f"got {self.kasa_regularizer_form!r}")
        if not _is_real(self.rose_keep) or not 0.0 < self.rose_keep <= 1.0:
            raise ValueError(f"AdapterConfig.rose_keep must be in (0, 1], got {self.rose_keep!r}")
        for name in ("rose_t_init", "rose_t_final"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"AdapterConfig.{name} must be an int ≥ 0, got {getattr(self, name)!r}")
        if self.rose_t_final < self.rose_t_init:
            raise ValueError(f"AdapterConfig.rose_t_final={self.rose_t_final} must be ≥ rose_t_init={self.rose_t_init}")
        if not _is_real(self.rose_ema) or not 0.0 <= self.rose_ema < 1.0:
            raise ValueError(f"AdapterConfig.rose_ema must be in [0, 1), got {self.rose_ema!r}")
        if self.rose_clamp is not None and (not _is_real(self.rose_clamp) or self.rose_clamp <= 0):
            raise ValueError(f"AdapterConfig.rose_clamp must be a finite number > 0 or None, got {self.rose_clamp!r}")
        if self.lalora_curvature not in ("diag", "kfac"):
            raise ValueError(f"AdapterConfig.lalora_curvature must be 'diag' or 'kfac', got {self.lalora_curvature!r}")
        if not _is_int(self.lalora_kfac_rank) or self.lalora_kfac_rank < 1:
            raise ValueError(f"AdapterConfig.lalora_kfac_rank must be an int ≥ 1, got {self.lalora_kfac_rank!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(d, dict):
            raise ValueError(f"an AdapterConfig is read from a dict of its fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AdapterConfig field(s) {sorted(unknown)} (written by a newer version?)")
        return cls(**d)
