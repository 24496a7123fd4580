"""bitsandbytes ``Linear4bit`` (QLoRA's NF4, or FP4; with or without double quantization), kept 4-bit."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..ops.lora_linear.quantized_weight import QuantizedWeight
from . import _bnb
from .base import BaseWeight


class Bnb4bitLinear(BaseWeight):
    """A quantized ``bitsandbytes.nn.Linear4bit`` (``weight`` a ``Params4bit`` holding packed 4-bit codes and its
    ``quant_state``). Read in place as an ``"nf4"`` / ``"fp4"`` :class:`QuantizedWeight`; re-quantized with the
    layer's own blocksize, quant type, double quantization and storage dtype.

    CPU trap (docs/design.md#quantized-bases): on CPUs with AVX512-BF16, bitsandbytes' first eval-mode forward
    without gradients repacks the weight in place into a CPU-only layout (``quant_state.packing_format_for_cpu``),
    which its ``dequantize_4bit`` then reads wrongly, without an error. :meth:`prepare` switches that repacking off
    (``support_avx512bf16_for_cpu = False``) and :meth:`quantized` undoes a repacking that already happened.
    """

    quantized_format = "4bit"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        bnb = _bnb.module()
        return (bnb is not None and isinstance(module, bnb.nn.Linear4bit)
                and getattr(module.weight, "quant_state", None) is not None)

    @property
    def quant_state(self):
        return self.module.weight.quant_state

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_state.dtype

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        # As Linear4bit.forward: its compute_dtype when set (transformers' bnb_4bit_compute_dtype), else the input's.
        return self.module.compute_dtype or input_dtype

    def prepare(self) -> None:
        self.module.support_avx512bf16_for_cpu = False
        self._unpack_cpu_layout()

    def _unpack_cpu_layout(self) -> None:
        state = self.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            return
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        # bitsandbytes' own inverse (what its state_dict and .cuda() use). The repacking had rounded the block
        # scales to bfloat16 (and the inverse re-quantizes double-quantized ones): the weight is no longer exactly
        # the one loaded, so say so.
        warnings.warn(f"{self.kind}: this Linear4bit had been repacked for bitsandbytes' CPU inference (an eval-mode "
                      "forward without gradients, before loranull_kernels switched that off); unpacked again, its "
                      "block scales keep the bfloat16 rounding the repacking gave them (relative error ≤ 2⁻⁸). "
                      "Inject before running the model in eval mode to keep the weights exactly as loaded",
                      stacklevel=3)
        w = self.module.weight
        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, state)
        state = w.quant_state
        if not state.nested and state.absmax.dim() == 2:
            # bitsandbytes 0.50's inverse restores the scales only when double-quantized: otherwise they stay in
            # the repacked (K / blocksize, N) bfloat16 layout, which every 4-bit reader then takes for the flat one.
            state.absmax = state.absmax.t().reshape(-1).float().contiguous()
        self.module.quant_state = state
        self.module.support_avx512bf16_for_cpu = False

    def quantized(self) -> QuantizedWeight:
        self._unpack_cpu_layout()
        s = self.quant_state
        data = self.module.weight.data
        if data.dtype != torch.uint8:  # quant_storage (e.g. bf16 for FSDP) is a container for the same bytes
            data = data.view(torch.uint8)
        nested = bool(s.nested)
        return QuantizedWeight(
            s.quant_type, data.reshape(-1), (int(s.shape[0]), int(s.shape[1])), absmax=s.absmax, code=s.code,
            blocksize=int(s.blocksize),
            absmax_code=s.state2.code if nested else None, absmax_scale=s.state2.absmax if nested else None,
            absmax_blocksize=int(s.state2.blocksize) if nested else 0,
            absmax_offset=s.offset.float().reshape(()) if nested else None)

    def dense(self) -> torch.Tensor:
        return self.quantized().dequantize(self.dtype)

    def requantize(self, weight: torch.Tensor) -> nn.Module:
        import bitsandbytes as bnb

        old, s = self.module, self.quant_state
        data, state = bnb.functional.quantize_4bit(
            weight.detach().to(s.dtype).contiguous(), blocksize=int(s.blocksize), compress_statistics=bool(s.nested),
            quant_type=s.quant_type, quant_storage=old.quant_storage)
        new = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=False, compute_dtype=old.compute_dtype,
                                compress_statistics=bool(s.nested), quant_type=s.quant_type,
                                quant_storage=old.quant_storage, device="meta")
        new.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=int(s.blocksize),
                                       compress_statistics=bool(s.nested), quant_type=s.quant_type,
                                       quant_storage=old.quant_storage, module=new, bnb_quantized=True)
        new.quant_state = state
        new.bias = old.bias  # the same Parameter: a bias is never copied
        new.compute_type_is_set = old.compute_type_is_set
        new.support_avx512bf16_for_cpu = False
        new.train(old.training)
        return new
