"""A frozen base weight kept quantized: what ``lora_linear`` takes as ``weight`` besides a dense tensor.

A :class:`QuantizedWeight` describes an (N, K) = (out_features, in_features) matrix by the tensors a quantization
library already holds (views, never copies), in one of these formats:

``"nf4"``, ``"fp4"``
    bitsandbytes' 4-bit layout (``Linear4bit``). ``data``: uint8, ⌈N·K/2⌉ bytes read flat (bitsandbytes keeps
    them as (⌈N·K/2⌉, 1)); element e of the row-major matrix is byte ⌊e/2⌋, the high nibble for even e, the low
    one for odd e. Its value is ``code[nibble] · absmax[⌊e / blocksize⌋]``: ``code`` float32 (16,) is the format's
    codebook (NF4 or FP4), ``absmax`` float32 (⌈N·K/blocksize⌉,) one scale per block of ``blocksize`` consecutive
    elements (blocks run across rows when K is not a multiple of ``blocksize``). With double quantization
    (bitsandbytes' ``compress_statistics``) ``absmax`` holds uint8 codes instead and the scale of block b is
    ``absmax_code[absmax[b]] · absmax_scale[⌊b / absmax_blocksize⌋] + absmax_offset``.
``"int8"``
    bitsandbytes' LLM.int8 row-wise layout (``Linear8bitLt``): ``data`` int8 (N, K), ``absmax`` float32 (N,)
    (bitsandbytes' ``SCB``); the value is ``data[n, k] · absmax[n] / 127``.
``"subclass"``
    a tensor subclass that dequantizes itself (torchao's quantized tensors): ``data`` is the (N, K) tensor, the
    value ``data.dequantize()``. Only the torch path reads it (dequantized per call, never stored for backward).

The fused op's Triton kernels dequantize nf4 / fp4 / int8 tiles inside their GEMMs; the torch backend dequantizes
the whole matrix per call (:meth:`QuantizedWeight.dequantize`) and frees it before returning, in the forward and
again in the backward, so no dense copy outlives a call. See docs/design.md#quantized-bases.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

#: Formats the Triton kernels read in place (``"subclass"`` is dequantized before the custom ops).
PACKED_FORMATS = ("nf4", "fp4", "int8")
FORMATS = PACKED_FORMATS + ("subclass",)
_DENSE = "dense"


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """An (out, in) frozen weight in one of the :data:`FORMATS` (see the module docstring for each layout)."""

    format: str
    data: torch.Tensor
    shape: tuple[int, int]  # (out_features, in_features) of the dequantized matrix
    absmax: Optional[torch.Tensor] = None
    code: Optional[torch.Tensor] = None
    blocksize: int = 0
    absmax_code: Optional[torch.Tensor] = None  # double quantization: the absmax codebook, float32 (256,)
    absmax_scale: Optional[torch.Tensor] = None  # double quantization: float32 (⌈n_blocks / absmax_blocksize⌉,)
    absmax_blocksize: int = 0
    absmax_offset: Optional[torch.Tensor] = None  # double quantization: 0-dim float32

    # ------------------------------------------------------------------------------------------------- facts
    @property
    def nested(self) -> bool:
        """True with double quantization (the block scales are themselves 8-bit codes)."""
        return self.absmax_code is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def requires_grad(self) -> bool:
        return bool(self.data.requires_grad)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the format reads (for device checks and byte counts)."""
        return [t for t in (self.data, self.absmax, self.code, self.absmax_code, self.absmax_scale,
                            self.absmax_offset) if t is not None]

    def nbytes(self) -> int:
        """Bytes held by the quantized representation (``data`` plus its scales and codebooks)."""
        if self.format == "subclass":
            return sum(t.numel() * t.element_size() for t in _subclass_tensors(self.data))
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ------------------------------------------------------------------------------------------ reading it
    def block_scales(self) -> torch.Tensor:
        """The float32 scale of every block: ``absmax`` itself, or its double-quantized codes decoded."""
        if not self.nested:
            return self.absmax.float()
        idx = torch.arange(self.absmax.numel(), device=self.device) // self.absmax_blocksize
        return self.absmax_code[self.absmax.long()] * self.absmax_scale[idx] + self.absmax_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) matrix in ``dtype``, a new contiguous tensor.

        nf4 / fp4 run bitsandbytes' own dequantization op when bitsandbytes is importable (its CPU and CUDA
        kernels are 20–30× faster than gathering from the codebook in PyTorch) and ``code`` is its codebook of the
        format (the op decodes with that one whatever ``code`` holds), the plain PyTorch gather otherwise; both
        give the same float32 values."""
        if self.format == "subclass":
            return self.data.dequantize().to(dtype)
        if self.format == "int8":
            return (self.data.float() * (self.absmax.float() / 127.0)[:, None]).to(dtype)
        op = _bnb_dequantize_4bit()
        if op is not None and dtype in (torch.float16, torch.bfloat16, torch.float32) and _bnb_codebook(self):
            return op(self.data, self.block_scales(), self.blocksize, self.format, list(self.shape), dtype)
        return self._gather_4bit().to(dtype)

    def _gather_4bit(self) -> torch.Tensor:
        n = self.shape[0] * self.shape[1]
        b = self.data.reshape(-1).to(torch.int64)
        nibbles = torch.stack([b >> 4, b & 15], dim=-1).reshape(-1)[:n]
        scales = self.block_scales().repeat_interleave(self.blocksize)[:n]
        return (self.code.float()[nibbles] * scales).view(self.shape)

    # ---------------------------------------------------------------------------------- the custom-op form
    def op_args(self) -> tuple[torch.Tensor, list[torch.Tensor], str, list[int]]:
        """``(data, state, format, meta)``: the tensors and ints the custom ops take (a dataclass cannot cross
        ``torch.library``): state = [absmax, code] (+ [absmax_code, absmax_scale, absmax_offset] when nested) for
        4-bit, [absmax] for int8, [] for subclass; meta = [out, in, blocksize, absmax_blocksize]."""
        if self.format in ("nf4", "fp4"):
            state = [self.absmax, self.code]
            if self.nested:
                state += [self.absmax_code, self.absmax_scale, self.absmax_offset]
        else:  # int8: the row scales; subclass: none (the autograd function dequantizes it before the op)
            state = [self.absmax] if self.format == "int8" else []
        return self.data, state, self.format, [self.shape[0], self.shape[1], self.blocksize, self.absmax_blocksize]

    @classmethod
    def from_op_args(cls, data: torch.Tensor, state: list[torch.Tensor], fmt: str, meta: list[int]) -> "QuantizedWeight":
        """Inverse of :meth:`op_args`."""
        shape = (int(meta[0]), int(meta[1]))
        if fmt in ("int8", "subclass"):
            return cls(fmt, data, shape, absmax=state[0] if state else None)
        nested = len(state) == 5
        return cls(fmt, data, shape, absmax=state[0], code=state[1], blocksize=int(meta[2]),
                   absmax_code=state[2] if nested else None, absmax_scale=state[3] if nested else None,
                   absmax_blocksize=int(meta[3]), absmax_offset=state[4] if nested else None)


def op_args(weight) -> tuple[torch.Tensor, list[torch.Tensor], str, list[int]]:
    """The custom-op form of a dense weight (``"dense"``, no state) or of a packed :class:`QuantizedWeight`."""
    if isinstance(weight, QuantizedWeight):
        return weight.op_args()
    return weight, [], _DENSE, []


def from_op_args(weight: torch.Tensor, state: list[torch.Tensor], fmt: str, meta: list[int]):
    """What a backend receives: the dense tensor itself, or the :class:`QuantizedWeight` the args describe."""
    return weight if fmt == _DENSE else QuantizedWeight.from_op_args(weight, state, fmt, meta)


def out_features(weight: torch.Tensor, fmt: str, meta: list[int]) -> int:
    """N of the custom-op form (for the fake implementations)."""
    return weight.shape[0] if fmt == _DENSE else int(meta[0])


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a dense (out, in) tensor of ``dtype``: itself when dense, dequantized otherwise."""
    return weight.dequantize(dtype) if isinstance(weight, QuantizedWeight) else weight


def _subclass_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a (torchao) tensor subclass, found through ``__tensor_flatten__``."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = flatten()
    return [leaf for n in names for leaf in _subclass_tensors(getattr(t, n))]


_BNB_OP = {}


def _bnb_dequantize_4bit():
    """``torch.ops.bitsandbytes.dequantize_4bit`` when bitsandbytes is importable, else None (looked up once)."""
    if "op" not in _BNB_OP:
        try:
            import bitsandbytes  # noqa: F401  (registers its torch ops)

            _BNB_OP["op"] = torch.ops.bitsandbytes.dequantize_4bit.default
        except Exception:  # not installed, or a broken native library: the PyTorch gather does the same job
            _BNB_OP["op"] = None
    return _BNB_OP["op"]


def _bnb_codebook(weight: QuantizedWeight) -> bool:
    """Whether ``weight.code`` holds bitsandbytes' own codebook of ``weight.format`` (a 16-value comparison; never
    during CUDA graph capture, where its synchronisation is not allowed: the gather path runs instead)."""
    code = weight.code
    # Remembered on the code tensor itself (a layer's quant_state keeps the same one), keyed by format and in-place
    # version: on CUDA the comparison is a host-device sync, which must not recur in every forward and backward.
    mark = getattr(code, "_loranull_bnb_codebook", None)
    if mark is not None and mark[:2] == (weight.format, code._version):
        return mark[2]
    if code.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    key = (weight.format, weight.device)
    if key not in _BNB_CODE:
        from bitsandbytes.functional import get_4bit_type

        _BNB_CODE[key] = get_4bit_type(weight.format, device=weight.device).float()
    same = torch.equal(code, _BNB_CODE[key])
    try:
        code._loranull_bnb_codebook = (weight.format, code._version, same)
    except (AttributeError, RuntimeError):  # a tensor that takes no attributes: compare every time
        pass
    return same


_BNB_CODE: dict = {}


def check(weight: QuantizedWeight, device: torch.device) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the field unless ``weight`` is a well-formed quantized weight on
    ``device`` (the formats' sizes are checked so that no kernel reads out of bounds)."""
    if weight.format not in FORMATS:
        raise ValueError(f"weight.format must be one of {FORMATS}, got {weight.format!r}")
    shape = weight.shape
    if (not isinstance(shape, tuple) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"weight.shape must be (out_features, in_features) ints, got {shape!r}")
    for name in ("data", "absmax", "code", "absmax_code", "absmax_scale", "absmax_offset"):
        t = getattr(weight, name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weight.{name} ({weight.format}) is a {type(t).__name__} where a tensor is expected")
        if t.device != device:
            raise ValueError(f"weight.{name} ({weight.format}) is on {t.device} but x is on {device}: all tensors "
                             "must be on one device")
    N, K = shape
    if weight.format == "subclass":
        if not callable(getattr(weight.data, "dequantize", None)):
            raise TypeError("weight.data of format 'subclass' must be a tensor with a dequantize() method (torchao)")
        if tuple(weight.data.shape) != shape:
            raise ValueError(f"weight.data has shape {tuple(weight.data.shape)}, weight.shape says {shape}")
        return
    if weight.format == "int8":
        _expect(weight.data, "data", torch.int8, (N, K))
        _expect(weight.absmax, "absmax", torch.float32, (N,))
        _expect_unit_stride(weight)  # the kernels index the row scales as absmax + row
        return
    n = N * K
    _expect(weight.data, "data", torch.uint8, None)
    if weight.data.numel() != (n + 1) // 2 or not weight.data.is_contiguous():
        raise ValueError(f"weight.data ({weight.format}) must be ⌈out·in/2⌉ = {(n + 1) // 2} contiguous bytes, got "
                         f"{weight.data.numel()} (shape {tuple(weight.data.shape)})")
    if isinstance(weight.blocksize, bool) or not isinstance(weight.blocksize, int) or weight.blocksize < 1:
        raise ValueError(f"weight.blocksize must be an int ≥ 1, got {weight.blocksize!r}")
    _expect(weight.code, "code", torch.float32, (16,))
    blocks = math.ceil(n / weight.blocksize)
    if weight.nested:
        _expect(weight.absmax, "absmax", torch.uint8, (blocks,))
        _expect(weight.absmax_code, "absmax_code", torch.float32, (256,))
        if isinstance(weight.absmax_blocksize, bool) or not isinstance(weight.absmax_blocksize, int) \
                or weight.absmax_blocksize < 1:
            raise ValueError(f"weight.absmax_blocksize must be an int ≥ 1, got {weight.absmax_blocksize!r}")
        _expect(weight.absmax_scale, "absmax_scale", torch.float32, (math.ceil(blocks / weight.absmax_blocksize),))
        _expect(weight.absmax_offset, "absmax_offset", torch.float32, ())
    else:
        _expect(weight.absmax, "absmax", torch.float32, (blocks,))
    _expect_unit_stride(weight)


def _expect_unit_stride(weight: QuantizedWeight) -> None:
    for name in ("absmax", "code", "absmax_code", "absmax_scale"):
        t = getattr(weight, name)
        if t is not None and t.stride(0) != 1:
            raise ValueError(f"weight.{name} must be contiguous (stride 1), got stride {t.stride(0)}")


def _expect(t, name: str, dtype: torch.dtype, shape) -> None:
    if t is None:
        raise ValueError(f"weight.{name} is missing")
    if t.dtype != dtype:
        hint = (" (uint8 block scales are double-quantized: give absmax_code, absmax_scale and absmax_offset too)"
                if name == "absmax" and t.dtype == torch.uint8 else "")
        raise TypeError(f"weight.{name} has dtype {t.dtype}; expected {dtype}{hint}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"weight.{name} must have shape {shape}, got {tuple(t.shape)}")
