"""``LoRALinear``: a drop-in ``nn.Linear`` with a low-rank adapter whose forward is one ``lora_linear`` call."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dtypes import compute_dtype
from .base_weights import BaseWeight, base_weight
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
    torchao) gives a :class:`~loranull_kernels.quantized_layer.QuantizedLoRALinear`, which keeps it quantized.
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
                  **method_kwargs) -> "LoRALinear":
        """Wrap a base layer with an adapter initialised by ``method``.

        A dense base (``nn.Linear`` of any float dtype and device, GPT-2's ``Conv1D``) is copied into the layer's
        own ``weight`` (out, in) and ``bias``. A quantized base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``,
        a torchao-quantized ``nn.Linear``) stays quantized: the result is a
        :class:`~loranull_kernels.quantized_layer.QuantizedLoRALinear` holding the module itself as
        ``base_layer`` (or, for methods that rewrite the base, a new module of the same kind holding the residual
        re-quantized with the layer's own settings). The initialiser sees the dequantized weight either way.

        Args:
            module: the base layer, or its :class:`~loranull_kernels.base_weights.BaseWeight`.
            r, alpha, dropout, method, **method_kwargs: the adapter's :class:`~loranull_kernels.AdapterConfig`
                fields (e.g. ``use_rslora=True``, ``freeze_A=True``, ``null_dim=256``); or pass ``config``.
            covariance: (in, in) input covariance, for calibrated methods (``lora_null``).
            generator: for the random initialisations (LoRA's kaiming A).
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
            with torch.no_grad():
                layer.weight.copy_(init.weight)
                if base.bias is not None:
                    layer.bias.copy_(base.bias)
        else:
            from .quantized_layer import QuantizedLoRALinear

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
