"""``AdapterConfig``: everything that defines an adapter, serialisable to JSON next to its weights.

A method is four orthogonal pieces (METHODS.md): an initialiser, a trainable set, an optional regulariser and an
optional sparsity schedule. ``method`` names the initialiser (and the pieces that come with it by default);
``freeze_A`` chooses the trainable set for any initialiser (LoRA-Null v2 is ``method="lora_null", freeze_A=True``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

METHOD_NAMES = ("lora", "pissa", "milora", "lora_null")


@dataclass
class AdapterConfig:
    """Configuration of the adapters :func:`loranull_kernels.inject` puts into a model.

    Attributes:
        method: ``"lora"``, ``"pissa"``, ``"milora"`` or ``"lora_null"``.
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

    def __post_init__(self):
        self.validate()

    @property
    def scaling(self) -> float:
        alpha = float(self.r if self.alpha is None else self.alpha)
        return alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r

    @property
    def needs_calibration(self) -> bool:
        from .methods import get_method

        return get_method(self.method).needs_calibration

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the offending field."""
        if self.method not in METHOD_NAMES:
            raise ValueError(f"AdapterConfig.method={self.method!r} is unknown; choose one of {METHOD_NAMES}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"AdapterConfig.r must be a positive int, got {self.r!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not math.isfinite(self.alpha)):
            raise ValueError(f"AdapterConfig.alpha must be a finite number or None, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            pass
        elif not (isinstance(self.target_modules, (list, tuple)) and self.target_modules
                  and all(isinstance(t, str) and t for t in self.target_modules)):
            raise ValueError("AdapterConfig.target_modules must be a non-empty list of module-name suffixes, "
                             f"a regular expression or 'all-linear', got {self.target_modules!r}")
        if self.null_dim is not None and (not isinstance(self.null_dim, int) or self.null_dim < self.r):
            raise ValueError(f"AdapterConfig.null_dim must be an int ≥ r={self.r} or None, got {self.null_dim!r}")
        if self.lora_null_init not in ("svd", "basis"):
            raise ValueError(f"AdapterConfig.lora_null_init must be 'svd' or 'basis', got {self.lora_null_init!r}")
        if self.lora_null_init == "basis" and self.null_dim not in (None, self.r):
            raise ValueError("AdapterConfig.lora_null_init='basis' (A0 = Qᵀ) needs null_dim = r")
        if self.pissa_oversample < 0 or self.pissa_n_iter < 0:
            raise ValueError("AdapterConfig.pissa_oversample and pissa_n_iter must be ≥ 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AdapterConfig field(s) {sorted(unknown)} (written by a newer version?)")
        return cls(**d)
