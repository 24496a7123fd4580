"""``QuantizedLoRALinear``: a :class:`~loranull_kernels.nn.LoRALinear` whose base stays quantized (QLoRA).

The base is the quantized module itself, held as the child ``base_layer`` (a bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` or a torchao-quantized ``nn.Linear``): no dense copy of it exists, in memory or in adapter files.
The forward is one :func:`~loranull_kernels.lora_linear` call on the base's
:class:`~loranull_kernels.ops.lora_linear.quantized_weight.QuantizedWeight`; the Triton kernels dequantize its tiles
inside the GEMMs, the torch backend per call. See docs/design.md#quantized-bases.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ._dtypes import compute_dtype
from .base_weights import BaseWeight, base_weight
from .base_weights.base import fingerprint
from .nn import LoRALinear
from .ops.lora_linear import lora_linear


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """``‖new − old‖_F / ‖old‖_F`` in float64 (0 when both are zero)."""
    num = (new.double() - old.double()).norm().item()
    den = old.double().norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


class QuantizedLoRALinear(LoRALinear):
    """``y = Q(W) x + s · (drop(x) (A⊙mask_A)ᵀ ⊙ d) (B⊙mask_B)ᵀ + bias`` with the base Q(W) kept quantized.

    Everything :class:`LoRALinear` documents holds, with these differences:

    - ``base_layer`` is the quantized module; ``weight`` and ``bias`` are its own (``weight`` is the packed
      tensor, e.g. bitsandbytes' ``Params4bit``; :attr:`base_dtype` is the float dtype it represents).
    - The forward computes in the base's compute dtype (bitsandbytes' ``compute_dtype`` when set, else the input's)
      and returns the input's dtype, as the quantized layer itself does. Adapters are float32.
    - Methods that rewrite the base (``W_base = W − s·B0A0``: pissa, milora, kasa, lora_null ``init="svd"``) follow
      ``AdapterConfig.quantized_rewrite``, recorded as :attr:`base_correction`:

      * ``"low_rank"`` (``base_correction`` True): ``base_layer`` stays the loaded quantized W and the forward
        passes ``A' = [A; A0]``, ``B' = [B, −B0]`` (rank 2r, the second half frozen) to the fused op, so the
        output is exactly the quantized model's at init. The frozen half sees the adapter's dropout too (at init
        the two halves cancel for every dropout mask);
      * ``"requantize"``: ``base_layer`` becomes a new module of the same kind holding ``Q(W − s·B0A0)``,
        re-quantized with the layer's own settings (PiSSA's QLoRA recipe). :attr:`init_report` records
        ``weight_change`` = ``‖Q(W − s·B0A0) + s·B0A0 − W‖_F / ‖W‖_F`` and ``residual_error`` =
        ``‖Q(R) − R‖_F / ‖R‖_F`` of the residual R (both 0 when the base is kept).

      W is the dequantized weight as loaded.
    - :meth:`original_weight` is exact unless the base holds a re-quantized residual or a merge. The non-persistent
      buffer ``original_fingerprint`` is the fingerprint of W taken when the layer was built; adapter files check
      against it.
    - :meth:`merge` / :meth:`unmerge` dequantize, add / subtract the adapter's change and re-quantize (bitsandbytes
      kinds), warning with the relative change the re-quantization caused; refused for torchao bases.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float | None = None, dropout: float = 0.0, *,
                 method: str = "lora", use_rslora: bool = False, has_rank_scale: bool = False,
                 base_correction: bool = True):
        nn.Module.__init__(self)
        base = base_weight(base_layer)
        if base is None or base.quantized_format is None:
            raise TypeError(f"QuantizedLoRALinear needs a quantized base layer (bitsandbytes Linear4bit / "
                            f"Linear8bitLt, torchao), got {type(base_layer).__name__}")
        self._set_shape(base.in_features, base.out_features, r, alpha, dropout, method, use_rslora)
        self._set_base_layer(base_layer)
        self._add_adapter(base.device, torch.float32, has_rank_scale)
        self.register_buffer("original_fingerprint", None, persistent=False)
        self.base_correction = base_correction
        self.init_report = {"weight_change": 0.0, "residual_error": 0.0}

    @classmethod
    def around(cls, base: BaseWeight, config, init, rewrites: bool, original: torch.Tensor) -> "QuantizedLoRALinear":
        """The layer for ``base`` with an initialiser's result ``init`` (its adapter tensors not yet copied in).
        ``rewrites``: the method changes the base under ``config``; ``original``: the dequantized W (out, in) the
        initialiser saw, in its compute dtype."""
        layer = cls(base.module, r=config.r, alpha=config.alpha, dropout=config.dropout, method=config.method,
                    use_rslora=config.use_rslora, has_rank_scale=init.rank_scale is not None,
                    base_correction=config.quantized_rewrite == "low_rank")
        layer.original_fingerprint = fingerprint(original)
        if rewrites and not layer.base_correction:
            B0 = init.lora_B if init.base_B is None else init.base_B
            A0 = init.lora_A if init.base_A is None else init.base_A
            layer.replace_base(init.weight, original, B0, A0)
        return layer

    @torch.no_grad()
    def replace_base(self, weight: torch.Tensor, original: torch.Tensor, B0: torch.Tensor, A0: torch.Tensor) -> None:
        """Hold ``weight`` (out, in), the residual ``original − s·B0A0``, re-quantized with the base's own settings
        as the new base (``quantized_rewrite="requantize"``), and record in :attr:`init_report` how far the
        effective weight ``Q(weight) + s·B0A0`` is from ``original`` (the dequantized W, float32/64)."""
        self._set_base_layer(self.base.requantize(weight))
        dt = original.dtype
        stored = self.base.dense().to(dt)
        self.init_report = {"weight_change": relative_change(stored + self.scaling * (B0.to(dt) @ A0.to(dt)), original),
                            "residual_error": relative_change(stored, weight.to(dt))}

    def _set_base_layer(self, module: nn.Module) -> None:
        if "base_layer" in self._modules:
            module.train(self.base_layer.training)
        self.base_layer = module
        self.base = base_weight(module)
        self.base.prepare()

    # ``weight`` and ``bias`` are the base layer's (as PEFT's quantized LoRA layers expose them)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def base_dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def carries_correction(self) -> bool:
        """True when the forward subtracts ``s·B0A0`` beside the adapter (``"low_rank"`` with a rewriting method)."""
        return self.base_correction and self.lora_B0 is not None

    @property
    def base_rewritten(self) -> bool:
        """True when the base no longer holds the weight as loaded (a re-quantized residual, or a merge)."""
        return self.merged or (not self.base_correction and self.lora_B0 is not None and bool(self.lora_B0.any()))

    # --------------------------------------------------------------------------------------------- computing
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(input)
        cdt = self.base.compute_dtype(input.dtype)
        x = input if input.dtype == cdt else input.to(cdt)
        bias = self.bias
        if bias is not None and bias.dtype != cdt:
            bias = bias.to(cdt)
        A, B, d, mask_A, mask_B = self.lora_A, self.lora_B, self.rank_scale, self.mask_A, self.mask_B
        if self.carries_correction:  # [A; A0], [B, −B0]: the frozen half only through cat's autograd
            A, B = torch.cat([A, self.lora_A0]), torch.cat([B, -self.lora_B0], dim=1)
            if d is not None:
                d = torch.cat([d, torch.ones_like(d)])
            if mask_A is not None:
                mask_A = torch.cat([mask_A, torch.ones_like(mask_A)])
            if mask_B is not None:
                mask_B = torch.cat([mask_B, torch.ones_like(mask_B)], dim=1)
        y = lora_linear(x, self.base.quantized(), A, B, self.scaling, bias=bias,
                        dropout_p=self.dropout if self.training else 0.0, rank_scale=d, mask_A=mask_A, mask_B=mask_B,
                        train_A=self.lora_A.requires_grad)
        return y if y.dtype == input.dtype else y.to(input.dtype)

    def _correction(self, dt: torch.dtype) -> torch.Tensor | float:
        """``s·B0A0`` when the forward subtracts it beside the adapter, else 0."""
        if not self.carries_correction:
            return 0.0
        return self.scaling * (self.lora_B0.to(dt) @ self.lora_A0.to(dt))

    def original_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The loaded W: ``dequantize(base)``, less a merged change, plus ``s·B0A0`` when the base holds the
        re-quantized residual; float32 or ``dtype`` (exact unless :attr:`base_rewritten`)."""
        dt = dtype or compute_dtype(self.base_dtype)
        W = self.base.dense().to(dt)
        if self.merged:
            W = W - self.delta_weight(dt) + self._correction(dt)
        if self.lora_A0 is not None and not self.base_correction:
            W = W + self.scaling * (self.lora_B0.to(dt) @ self.lora_A0.to(dt))
        return W

    # ------------------------------------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter's change into the base: dequantize, add it, re-quantize with the layer's settings (a
        warning gives the relative change the re-quantization made to the merged weight)."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): already merged")
        self._requantize_with(+1.0, "merge")
        self._set_merged(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (dequantize, subtract the change, re-quantize: lossy, the warning says by how much)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): not merged")
        self._requantize_with(-1.0, "unmerge")
        self._set_merged(False)

    def _requantize_with(self, sign: float, what: str) -> None:
        why = self.base.requantize_refusal()
        if why:
            raise RuntimeError(f"LoRALinear.{what}(): {why}; keep the adapter unmerged (or merge into a dense "
                               "copy of the model)")
        dt = torch.float32
        change = self.delta_weight(dt) - self._correction(dt)  # what the forward adds to Q(W) while unmerged
        target = self.base.dense().to(dt) + sign * change
        self._set_base_layer(self.base.requantize(target))
        err = relative_change(self.base.dense().to(dt), target)
        warnings.warn(f"LoRALinear.{what}() on a {self.base.kind} base re-quantized the weight: it differs from the "
                      f"exact {'merged' if sign > 0 else 'unmerged'} weight by {err:.2e} relative (Frobenius)",
                      stacklevel=3)

    def extra_repr(self) -> str:
        fmt = self.base.quantized().format
        text = super().extra_repr() + f", base={self.base.kind}({fmt})"
        return text + (", base correction at rank r" if self.carries_correction else "")
