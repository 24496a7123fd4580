"""``LoRALinear``: a drop-in ``nn.Linear`` with a low-rank adapter whose forward is one ``lora_linear`` call, and
``QuantizedLoRALinear``: the same over a base kept quantized (QLoRA: bitsandbytes 4-/8-bit, torchao), held as the
child ``base_layer`` and read in place by the fused op (docs/design.md#quantized-bases)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ._dtypes import compute_dtype
from .base_weights import BaseWeight, base_weight
from .base_weights.base import fingerprint
from .config import AdapterConfig, adapter_scaling
from .methods import SPARSITY, get_method
from .ops.lora_linear import lora_linear


# Buffers that are None until a method sets them (RoseLoRA's masks, the base-rewriting methods' initial factors).
_OPTIONAL_BUFFERS = ("mask_A", "mask_B", "lora_A0", "lora_B0")


class LoRALinear(nn.Module):
    """``y = x Wᵀ + s · (drop(x) (A⊙mask_A)ᵀ ⊙ d) (B⊙mask_B)ᵀ + bias``, forward and backward fused.

    Same ``forward(input)`` signature and the same ``in_features``, ``out_features``, ``weight`` (out, in) and
    ``bias`` (out,) attributes as ``nn.Linear``. ``weight`` is frozen: it holds the base (the residual
    ``W − s·B0A0`` for methods that rewrite it). Parameters ``lora_A`` (r, in), ``lora_B`` (out, r) and, for methods
    that have one, ``rank_scale`` (r,); buffers ``mask_A`` / ``mask_B`` (bool, RoseLoRA) and ``lora_A0`` /
    ``lora_B0`` (for methods that rewrite the base: the factors with ``weight + s·B0A0 = W``, i.e. the initial
    adapter of pissa / milora / lora_null and KaSA's truncated components; kept so the adapter can be converted to
    a plain LoRA on the original weight). ``scaling`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The
    0-dim bool buffer ``lora_merged`` records :meth:`merge` in the ``state_dict`` (``merged`` mirrors it), so a
    merged state loads merged; optional buffers a state has (masks, ``lora_A0`` / ``lora_B0``) are adopted on load.

    A is trained iff ``lora_A.requires_grad`` (``freeze_A`` / LoRA-Null v2 turns it off, and the backward then
    neither computes dA nor keeps x). Dropout applies in training mode only. Adapters of half-precision bases are
    kept in float32 (as PEFT does); inputs are cast to the base's dtype.

    Build one with :meth:`from_base` (any layer the base-weight seam knows) or :meth:`from_linear`;
    :func:`loranull_kernels.inject` does it for a whole model. A quantized base (bitsandbytes 4-bit / 8-bit,
    torchao) gives a :class:`QuantizedLoRALinear`, which keeps it quantized.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float | None = None,
                 dropout: float = 0.0, bias: bool = True, *, method: str = "lora", use_rslora: bool = False,
                 has_rank_scale: bool = False, device=None, dtype=None, adapter_dtype=None):
        super().__init__()
        self._set_shape(in_features, out_features, r, alpha, dropout, method, use_rslora)
        dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._add_adapter(device, adapter_dtype or (torch.float32 if dtype in (torch.float16, torch.bfloat16)
                                                    else dtype), has_rank_scale)

    def _set_shape(self, in_features, out_features, r, alpha, dropout, method, use_rslora) -> None:
        for name, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LoRALinear: {name} must be an int, got {v!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout must be a number in [0, 1), got {dropout!r}")
        if r < 1 or r > min(in_features, out_features):
            raise ValueError(f"r={r} must be in [1, min(in_features, out_features) = {min(in_features, out_features)}]")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora, self.method, self.dropout = r, alpha, use_rslora, method, float(dropout)
        self.scaling = adapter_scaling(r, alpha, use_rslora)

    def _add_adapter(self, device, adapter_dtype: torch.dtype, has_rank_scale: bool) -> None:
        """The adapter's parameters and buffers (the base is the caller's)."""
        in_features, out_features, r = self.in_features, self.out_features, self.r
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=adapter_dtype))
        if has_rank_scale:
            self.rank_scale = nn.Parameter(torch.ones(r, device=device, dtype=adapter_dtype))
        else:
            self.register_parameter("rank_scale", None)
        for name in _OPTIONAL_BUFFERS:
            self.register_buffer(name, None)
        # The merge state travels with the state_dict (the weight it describes is merged or not); ``merged`` is its
        # Python mirror, read on every forward without a device sync.
        self.register_buffer("lora_merged", torch.zeros((), dtype=torch.bool, device=device))
        self.merged = False

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                    method: str = "lora", *, config: AdapterConfig | None = None,
                    covariance: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    **method_kwargs) -> "LoRALinear":
        """:meth:`from_base` for an ``nn.Linear`` (a ``TypeError`` for anything else)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls.from_base(linear, r, alpha, dropout, method, config=config, covariance=covariance,
                             generator=generator, **method_kwargs)

    @classmethod
    def from_base(cls, module: nn.Module | BaseWeight, r: int = 8, alpha: float | None = None,
                  dropout: float = 0.0, method: str = "lora", *, config: AdapterConfig | None = None,
                  covariance: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  share_base: bool = False, **method_kwargs) -> "LoRALinear":
        """Wrap a base layer with an adapter initialised by ``method``.

        A dense base (``nn.Linear`` of any float dtype and device, GPT-2's ``Conv1D``) is copied into the layer's
        own ``weight`` (out, in) and ``bias``. A quantized base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``,
        a torchao-quantized ``nn.Linear``) stays quantized: the result is a
        :class:`QuantizedLoRALinear` holding the module itself as
        ``base_layer``; for methods that rewrite the base, ``quantized_rewrite="low_rank"`` (the default) keeps it
        and carries ``−s·B0A0`` frozen beside the adapter, ``"requantize"`` holds a new module of the same kind with
        the residual re-quantized with the layer's own settings. The initialiser sees the dequantized weight.

        Args:
            module: the base layer, or its :class:`~loranull_kernels.base_weights.BaseWeight`.
            r, alpha, dropout, method, **method_kwargs: the adapter's :class:`~loranull_kernels.AdapterConfig`
                fields (e.g. ``use_rslora=True``, ``freeze_A=True``, ``null_dim=256``); or pass ``config``.
            covariance: (in, in) input covariance, for calibrated methods (``lora_null``).
            generator: for the random initialisations (LoRA's kaiming A).
            share_base: a dense ``nn.Linear`` base the method leaves unchanged is not copied: the layer holds the
                module's own ``weight`` and ``bias`` Parameters (what :func:`~loranull_kernels.inject` does, so
                that the replaced module costs no memory while it is kept for a rollback). A merge then writes
                into them.
        """
        base = module if isinstance(module, BaseWeight) else base_weight(module)
        if base is None:
            raise TypeError(f"from_base needs a linear layer (nn.Linear, transformers' Conv1D, bitsandbytes "
                            f"Linear4bit / Linear8bitLt, a torchao-quantized nn.Linear), got {type(module).__name__}")
        cfg = config or AdapterConfig(method=method, r=r, alpha=alpha, dropout=dropout, **method_kwargs)
        in_f, out_f = base.in_features, base.out_features
        if cfg.r > min(in_f, out_f):
            raise ValueError(f"r={cfg.r} exceeds min(in_features, out_features) = {min(in_f, out_f)} of this layer")
        meth = get_method(cfg.method)
        why = meth.check_layer and meth.check_layer(cfg, in_f, out_f)
        if why:
            raise ValueError(f"{why} of this layer ({in_f} → {out_f})")
        rewrites = meth.rewrites_base_for(cfg)
        refusal = base.requantize_refusal() if rewrites and cfg.quantized_rewrite == "requantize" else None
        if refusal:
            raise ValueError(f"AdapterConfig.quantized_rewrite='requantize' with method {cfg.method!r}, but "
                             f"{refusal}: use quantized_rewrite='low_rank'")
        W = base.dense()
        if generator is None and cfg.init_seed is not None:
            generator = torch.Generator(device=W.device).manual_seed(cfg.init_seed)
        W = W.to(compute_dtype(W.dtype))
        init = meth.initialize(W, cfg.r, cfg.scaling, cfg,
                               covariance=None if covariance is None else covariance.to(W.device),
                               generator=generator)
        if base.quantized_format is None:
            layer = cls(in_f, out_f, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, bias=base.bias is not None,
                        method=cfg.method, use_rslora=cfg.use_rslora, has_rank_scale=init.rank_scale is not None,
                        device=W.device, dtype=base.dtype)
            if share_base and not rewrites and isinstance(base.module, nn.Linear):
                layer.weight = base.module.weight
                if base.bias is not None:
                    layer.bias = base.module.bias
            else:
                with torch.no_grad():
                    layer.weight.copy_(init.weight)
                    if base.bias is not None:
                        layer.bias.copy_(base.bias)
        else:
            layer = QuantizedLoRALinear.around(base, cfg, init, rewrites, original=W)
        with torch.no_grad():
            layer.lora_A.copy_(init.lora_A)
            layer.lora_B.copy_(init.lora_B)
            if init.rank_scale is not None:
                layer.rank_scale.copy_(init.rank_scale)
        if meth.rewrites_base:
            if init.base_A is not None:  # the removed part is not the initial adapter (KaSA's truncated components)
                layer.lora_A0 = init.base_A.to(layer.lora_A.dtype).contiguous()
                layer.lora_B0 = init.base_B.to(layer.lora_B.dtype).contiguous()
            else:
                layer.lora_A0 = layer.lora_A.detach().clone()
                layer.lora_B0 = layer.lora_B.detach().clone()
        layer.lora_A.requires_grad_(not cfg.freeze_A)
        if layer.bias is not None:
            layer.bias.requires_grad_(cfg.train_bias)
        layer.adapter_config = cfg
        layer.attach_pieces()
        return layer

    def attach_pieces(self) -> None:
        """Register the state buffers of the layer's sparsity schedule (RoseLoRA's importance) up front, so a
        freshly built layer has the state_dict keys a trained one has (a strict ``load_state_dict`` of a trained
        model into a fresh one works)."""
        cfg = getattr(self, "adapter_config", None)
        piece = None if cfg is None else cfg.effective_sparsity
        if piece is not None:
            SPARSITY[piece].attach(self, cfg)

    # --------------------------------------------------------------------------------------------- computing
    @property
    def base_dtype(self) -> torch.dtype:
        """The float dtype of the base weight (a quantized base: the dtype it was quantized from)."""
        return self.weight.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input if input.dtype == self.weight.dtype else input.to(self.weight.dtype)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, bias=self.bias,
                           dropout_p=self.dropout if self.training else 0.0, rank_scale=self.rank_scale,
                           mask_A=self.mask_A, mask_B=self.mask_B, train_A=self.lora_A.requires_grad)

    def effective_factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A⊙mask_A (r, in), (B⊙mask_B) diag(d) (out, r))``: the adapter as one plain LoRA pair, detached, in
        float32 (float64 for float64 bases) or ``dtype``."""
        dt = dtype or compute_dtype(self.base_dtype)
        A = self.lora_A.detach().to(dt)
        B = self.lora_B.detach().to(dt)
        if self.mask_A is not None:
            A = A * self.mask_A
        if self.mask_B is not None:
            B = B * self.mask_B
        if self.rank_scale is not None:
            B = B * self.rank_scale.detach().to(dt)
        return A, B

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s · (B⊙mask_B) diag(d) (A⊙mask_A)`` (out, in), in float32 (float64 for float64 bases) or ``dtype``."""
        A, B = self.effective_factors(dtype)
        return self.scaling * (B @ A)

    def original_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The pre-trained W the adapter was built from: ``weight + s·B0A0`` (unmerged), in float32/64 or ``dtype``."""
        dt = dtype or compute_dtype(self.base_dtype)
        W = self.weight.detach().to(dt)
        if self.merged:
            W = W - self.delta_weight(dt)
        if self.lora_A0 is not None:
            W = W + self.scaling * (self.lora_B0.to(dt) @ self.lora_A0.to(dt))
        return W

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (forward becomes a plain linear). Exact to float64 rounding for float64
        bases; half-precision bases round the merged weight once to their dtype. Entries the adapter does not
        touch (zero ΔW, e.g. outside RoseLoRA's masks) are left bit-identical."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): already merged")
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) + delta)
        self._set_merged(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (subtracts the same ΔW; a round trip is exact to the base dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): not merged")
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) - delta)
        self._set_merged(False)

    def _set_merged(self, merged: bool) -> None:
        self.merged = merged
        if self.lora_merged is not None:
            self.lora_merged.fill_(merged)

    # ------------------------------------------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Optional buffers the state has but this layer has not yet (a RoseLoRA layer saved after its masks were
        # set, a base-rewriting layer loaded into a bare one): allocate them so the default loader fills them.
        like = {"mask_A": (self.lora_A, torch.bool), "mask_B": (self.lora_B, torch.bool),
                "lora_A0": (self.lora_A, self.lora_A.dtype), "lora_B0": (self.lora_B, self.lora_B.dtype)}
        for name in _OPTIONAL_BUFFERS:
            t = state_dict.get(prefix + name)
            if t is None or getattr(self, name) is not None:
                continue
            ref, dtype = like[name]
            if tuple(t.shape) != tuple(ref.shape):
                error_msgs.append(f"size mismatch for {prefix}{name}: copying a param with shape {tuple(t.shape)} "
                                  f"from checkpoint, the shape in current model is {tuple(ref.shape)}.")
                continue
            setattr(self, name, torch.empty(ref.shape, dtype=dtype, device=ref.device))
        merged_key = prefix + "lora_merged"
        had_merged = merged_key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if had_merged:
            self.merged = bool(self.lora_merged)
        elif merged_key in missing_keys:  # a state_dict from before the merge state was recorded: unmerged
            missing_keys.remove(merged_key)

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}, r={self.r}, alpha={self.r if self.alpha is None else self.alpha}, "
                f"scaling={self.scaling:.4g}, dropout={self.dropout}")
        if self.use_rslora:
            text += ", rslora"
        if not self.lora_A.requires_grad:
            text += ", A frozen"
        if self.mask_A is not None or self.mask_B is not None:
            text += ", masked"
        if self.merged:
            text += ", merged"
        return text


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
    - :meth:`original_weight` is exact unless the base holds a re-quantized residual or a merge. The attribute
      ``original_fingerprint`` (float64, CPU) is the fingerprint of W taken when the layer was built; adapter files
      check against it.
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
        # A plain attribute, not a buffer: model.cuda() / .half() must neither move nor round it (it is compared in
        # float64 on the CPU when an adapter file is saved or loaded).
        self.original_fingerprint: torch.Tensor | None = None
        self.base_correction = base_correction
        self.init_report = {"weight_change": 0.0, "residual_error": 0.0}
        self._requantized = False  # a merge (even undone) re-quantized the base: W is no longer exactly the loaded one

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
        """True when the base no longer holds the weight as loaded (a re-quantized residual, or a merge, even one
        undone: unmerge re-quantizes again)."""
        return self.merged or self._requantized or (
            not self.base_correction and self.lora_B0 is not None and bool(self.lora_B0.any()))

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
        self._requantized = True
        err = relative_change(self.base.dense().to(dt), target)
        warnings.warn(f"LoRALinear.{what}() on a {self.base.kind} base re-quantized the weight: it differs from the "
                      f"exact {'merged' if sign > 0 else 'unmerged'} weight by {err:.2e} relative (Frobenius)",
                      stacklevel=3)

    def extra_repr(self) -> str:
        fmt = self.base.quantized().format
        text = super().extra_repr() + f", base={self.base.kind}({fmt})"
        return text + (", base correction at rank r" if self.carries_correction else "")
