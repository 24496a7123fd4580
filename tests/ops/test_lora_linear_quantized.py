"""lora_linear on a quantized base (``QuantizedWeight``: bitsandbytes nf4 / fp4 with and without double
quantization, int8 row-wise): forward and every gradient of both backends against the float64 reference on
``reference.dequantize(qw)``; the layouts bitsandbytes itself produces; misuse errors naming the field; no dense
copy of W kept for the backward, and none made at all by the Triton backend (it dequantizes tiles in its GEMMs).

Most weights are synthetic (random bytes, random positive scales, a random codebook), so the op tests need no
quantizer and exercise every byte value and scale; the shapes make blocks straddle rows (K not a multiple of the
block size) and rows start mid-byte (odd K, odd N·K)."""
import contextlib
import dataclasses
import math
from unittest import mock

import pytest
import torch

import loranull_kernels as lk
from loranull_kernels import reference
from loranull_kernels.ops.lora_linear import QuantizedWeight

from ..conftest import DEVICE
from ..helpers import assert_close, f64
from .test_lora_linear import FEATURES, check_empty_batch, make_inputs
from .test_lora_linear import run_and_compare as dense_run_and_compare

BACKENDS = ["torch", "triton"]
CPU_DTYPES = [torch.float32, torch.float16]
# (leading dims of x, in, out, r): N·K = 1305 is odd (the last byte holds one nibble, odd rows start at a low
# nibble) and neither K is a multiple of a block size, so blocks straddle rows; r = 17 pads to 32.
SHAPES = [((2, 19), 45, 29, 5), ((37,), 70, 33, 17)]
FORMATS = ["nf4", "fp4", "nf4-nested", "fp4-nested", "int8"]


def make_quantized(fmt: str, N: int, K: int, device=DEVICE, blocksize: int = 64,
                   absmax_blocksize: int = 5) -> QuantizedWeight:
    """A random (N, K) base in ``fmt`` ("nf4", "fp4", "int8", "<4bit>-nested"), entries of order 1/√K: random
    bytes, a random codebook (not bitsandbytes' own, so no path can assume it), random positive scales."""
    g = dict(device=device)
    if fmt == "int8":
        data = torch.randint(-127, 128, (N, K), dtype=torch.int8, **g)
        return QuantizedWeight("int8", data, (N, K), absmax=(0.5 + torch.rand(N, **g)) * 2 / math.sqrt(K))
    base, nested = fmt.removesuffix("-nested"), fmt.endswith("-nested")
    n = N * K
    blocks = math.ceil(n / blocksize)
    data = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, **g)
    code = torch.rand(16, **g) * 2 - 1
    if not nested:
        return QuantizedWeight(base, data, (N, K), absmax=(0.5 + torch.rand(blocks, **g)) / math.sqrt(K), code=code,
                               blocksize=blocksize)
    return QuantizedWeight(
        base, data, (N, K), absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8, **g), code=code,
        blocksize=blocksize, absmax_code=torch.rand(256, **g),
        absmax_scale=(0.5 + torch.rand(math.ceil(blocks / absmax_blocksize), **g)) / math.sqrt(K),
        absmax_blocksize=absmax_blocksize, absmax_offset=torch.tensor(0.2 / math.sqrt(K), **g))


@contextlib.contextmanager
def _no_dense_weight(backend: str):
    """On the Triton backend, fail if anything dequantizes the whole matrix: its kernels read W in place."""
    if backend != "triton":
        yield
        return
    with mock.patch.object(QuantizedWeight, "dequantize", side_effect=AssertionError("W was dequantized")):
        yield


def run_and_compare(backend, x, qw, A, B, kw, dtype, seed=1234):
    """lora_linear on ``backend`` with the quantized base ``qw``, then the float64 reference on
    ``reference.dequantize(qw)`` with the same dropout mask; output and every gradient compared."""
    return dense_run_and_compare(backend, x, qw, A, B, kw, dtype, seed, ref_weight=reference.dequantize(qw),
                                 guard=_no_dense_weight(backend))


def _inputs(fmt, shape, dtype, features, device=DEVICE, adapter_dtype=None, **quant):
    lead, K, N, r = shape
    x, _, A, B, kw = make_inputs(lead, K, N, r, dtype, features, adapter_dtype=adapter_dtype, device=device)
    return x, make_quantized(fmt, N, K, device=device, **quant), A, B, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
def test_matches_reference(backend, dtype, fmt, shape):
    """Every format, both input dtypes, odd shapes, with bias, dropout, rank_scale and both masks at once."""
    x, qw, A, B, kw = _inputs(fmt, shape, dtype, FEATURES["all"])
    run_and_compare(backend, x, qw, A, B, kw, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4-nested", "int8"])
@pytest.mark.parametrize("feature", [f for f in FEATURES if f != "all"])
def test_each_feature(backend, fmt, feature):
    x, qw, A, B, kw = _inputs(fmt, SHAPES[1], torch.float32, FEATURES[feature])
    run_and_compare(backend, x, qw, A, B, kw, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [8, 48, 256])
def test_block_sizes(backend, nested, blocksize):
    """Blocks much shorter than a tile row (8: five per 32-wide tile row), a size that is no power of two (48:
    the kernels' constexpr division), and blocks spanning several rows (256); nested scales per 3 blocks."""
    fmt = "nf4-nested" if nested else "nf4"
    x, qw, A, B, kw = _inputs(fmt, SHAPES[0], torch.float32, FEATURES["all"], blocksize=blocksize,
                              absmax_blocksize=3)
    run_and_compare(backend, x, qw, A, B, kw, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapters_beside_half_input(backend):
    x, qw, A, B, kw = _inputs("nf4-nested", ((23,), 45, 29, 6), torch.float16, FEATURES["all"],
                              adapter_dtype=torch.float32)
    run_and_compare(backend, x, qw, A, B, kw, torch.float16)


def _strided_x(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values as a non-contiguous leaf: every other column of a wider buffer, column-major, or at an offset
    in a buffer of NaN."""
    x = x.detach()
    if layout == "strided":
        out = torch.stack([x, torch.full_like(x, math.nan)], dim=-1)[..., 0]
    elif layout == "transposed":
        out = x.t().contiguous().t()
    else:
        buf = torch.full((x.numel() + 14,), math.nan, dtype=x.dtype, device=x.device)
        buf[7:7 + x.numel()] = x.reshape(-1)
        out = buf[7:7 + x.numel()].view(x.shape)
    assert not out.is_contiguous() or out.storage_offset() == 7
    return out.requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4-nested", "int8"])
@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
def test_odd_strides_of_x(backend, fmt, layout):
    x, qw, A, B, kw = _inputs(fmt, ((31,), 45, 29, 5), torch.float32, FEATURES["all"])
    run_and_compare(backend, _strided_x(x, layout), qw, A, B, kw, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
def test_int8_data_strided(backend, layout):
    """bitsandbytes keeps int8 codes contiguous, but the format allows any strides: the gaps hold -128, a code the
    quantizer never writes, so a misread element shows."""
    x, qw, A, B, kw = _inputs("int8", ((31,), 45, 29, 5), torch.float32, FEATURES["all"])
    d = qw.data
    if layout == "strided":
        data = torch.stack([d, torch.full_like(d, -128)], dim=-1)[..., 0]
    elif layout == "transposed":
        data = d.t().contiguous().t()
    else:
        buf = torch.full((d.numel() + 14,), -128, dtype=torch.int8, device=d.device)
        buf[7:7 + d.numel()] = d.reshape(-1)
        data = buf[7:7 + d.numel()].view(d.shape)
    assert torch.equal(data, d) and (not data.is_contiguous() or data.storage_offset() == 7)
    run_and_compare(backend, x, dataclasses.replace(qw, data=data), A, B, kw, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    check_empty_batch(backend, *_inputs("nf4-nested", ((0,), 45, 29, 5), torch.float32, FEATURES["all"]))


@pytest.mark.parametrize("fmt", ["nf4-nested", "int8"])
def test_gradcheck_torch_backend(fmt):
    """float64 inputs (the torch backend only): autograd through the quantized base, by finite differences."""
    x, qw, A, B, kw = _inputs(fmt, ((2, 5), 7, 6, 3), torch.float64, FEATURES["all"], device="cpu", blocksize=4,
                              absmax_blocksize=2)

    def fn(x, A, B, d, b):
        return lk.lora_linear(x, qw, A, B, kw["scaling"], bias=b, dropout_p=kw["dropout_p"], rank_scale=d,
                              mask_A=kw["mask_A"], mask_B=kw["mask_B"], seed=77)

    with lk.backend.use("torch"):
        assert torch.autograd.gradcheck(fn, (x, A, B, kw["rank_scale"], kw["bias"]), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4", "nf4-nested", "int8"])
def test_backward_keeps_no_dense_weight(backend, fmt):
    """What the autograd graph saves: the quantized tensors, never an (N, K) float matrix (a dequantized copy)."""
    N, K = 29, 45
    x, qw, A, B, kw = _inputs(fmt, ((40,), K, N, 5), torch.float32, FEATURES["all"])
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lk.backend.use(backend):
        y = lk.lora_linear(x, qw, A, B, seed=1, **kw)
    dense = [s for s in saved if s[1].is_floating_point and (s[0] == (N, K) or s[2] == N * K)]
    assert not dense, f"a dense copy of W was saved for backward: {dense}"
    assert any(s[1] == qw.data.dtype and s[2] == qw.data.numel() for s in saved), "the quantized data is not saved"
    y.sum().backward()
    assert x.grad is not None and A.grad is not None


# ---------------------------------------------------------------------------------------------- bitsandbytes
def _from_bnb_4bit(packed, state) -> QuantizedWeight:
    """The QuantizedWeight of ``bitsandbytes.functional.quantize_4bit``'s output (views, as the docstring says)."""
    N, K = state.shape
    if not state.nested:
        return QuantizedWeight(state.quant_type, packed, (N, K), absmax=state.absmax, code=state.code,
                               blocksize=state.blocksize)
    return QuantizedWeight(state.quant_type, packed, (N, K), absmax=state.absmax, code=state.code,
                           blocksize=state.blocksize, absmax_code=state.state2.code,
                           absmax_scale=state.state2.absmax, absmax_blocksize=state.state2.blocksize,
                           absmax_offset=state.offset)


def _move(qw: QuantizedWeight, device) -> QuantizedWeight:
    fields = {f.name: getattr(qw, f.name) for f in dataclasses.fields(qw)}
    return QuantizedWeight(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("N, K", [(29, 45), (9, 130)], ids=["odd", "even"])
def test_bitsandbytes_4bit_layout(quant_type, compress_statistics, N, K):
    """Weights quantized by bitsandbytes itself: the format as QuantizedWeight reads it dequantizes to what
    bitsandbytes' own ``dequantize_4bit`` gives, and both backends run on it (odd N·K: a half-used last byte; even
    K: bitsandbytes' native CPU dequantization, which an odd last dimension sends to its generic path)."""
    F = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(N, K) / math.sqrt(K)
    packed, state = F.quantize_4bit(W, blocksize=64, compress_statistics=compress_statistics, quant_type=quant_type)
    qw = _from_bnb_4bit(packed, state)
    assert qw.nested == compress_statistics
    expected = F.dequantize_4bit(packed, state).to(torch.float64)
    assert_close(reference.dequantize(qw), expected, torch.float32, "reference.dequantize", tol=1e-6)
    assert_close(qw.dequantize(torch.float32), expected, torch.float32, "QuantizedWeight.dequantize", tol=1e-6)
    assert (expected - W).abs().max() < 0.3 * W.abs().max()  # it is W, quantized (not a layout that decodes to noise)

    qw = _move(qw, DEVICE)
    for backend in BACKENDS:
        x, _, A, B, kw = make_inputs((17,), K, N, 5, torch.float32, FEATURES["all"])
        run_and_compare(backend, x, qw, A, B, kw, torch.float32)


def test_bitsandbytes_int8_layout():
    """An LLM.int8 base as bitsandbytes' ``Linear8bitLt`` holds it (``weight.data`` int8, ``weight.SCB``)
    dequantizes to what bitsandbytes' own ``int8_vectorwise_dequant`` gives; both backends run on it."""
    bnb = pytest.importorskip("bitsandbytes")
    N, K = 29, 45
    W = (torch.randn(N, K) / math.sqrt(K)).to(torch.float16)
    layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False)
    layer.load_state_dict({"weight": W})
    layer = layer.to("cpu")
    data, scb = layer.weight.data, layer.weight.SCB
    assert data.dtype == torch.int8 and tuple(data.shape) == (N, K) and scb is not None
    qw = QuantizedWeight("int8", data, (N, K), absmax=scb)
    expected = bnb.functional.int8_vectorwise_dequant(data, scb).to(torch.float64)
    assert_close(reference.dequantize(qw), expected, torch.float32, "reference.dequantize", tol=1e-6)
    assert_close(qw.dequantize(torch.float32), expected, torch.float32, "QuantizedWeight.dequantize", tol=1e-6)
    assert (expected - W.double()).abs().max() <= scb.max() / 127  # within one quantization step of W

    qw = _move(qw, DEVICE)
    for backend in BACKENDS:
        x, _, A, B, kw = make_inputs((17,), K, N, 5, torch.float16, FEATURES["all"])
        run_and_compare(backend, x, qw, A, B, kw, torch.float16)


# --------------------------------------------------------------------------------------------------- misuse
def _bad(fmt, change):
    qw = make_quantized(fmt, 29, 45)
    return dataclasses.replace(qw, **change(qw))


_OTHER_DEVICE = "meta" if DEVICE == "cpu" else "cpu"
MISUSE = {
    "format": ("nf4", lambda q: {"format": "q4"}, ValueError, r"weight\.format"),
    "data dtype": ("nf4", lambda q: {"data": q.data.view(torch.int8)}, TypeError, r"weight\.data has dtype"),
    "data size": ("nf4", lambda q: {"data": q.data[:-1]}, ValueError, r"weight\.data .*653"),
    "blocksize": ("nf4", lambda q: {"blocksize": 0}, ValueError, r"weight\.blocksize"),
    "absmax dtype": ("nf4", lambda q: {"absmax": q.absmax.half()}, TypeError, r"weight\.absmax has dtype"),
    "absmax size": ("nf4", lambda q: {"absmax": q.absmax[:-1]}, ValueError, r"weight\.absmax must have shape"),
    "code size": ("fp4", lambda q: {"code": q.code[:15]}, ValueError, r"weight\.code must have shape"),
    "nested absmax dtype": ("nf4-nested", lambda q: {"absmax": q.absmax.float()}, TypeError,
                            r"weight\.absmax has dtype"),
    "absmax_scale size": ("nf4-nested", lambda q: {"absmax_scale": q.absmax_scale[:-1]}, ValueError,
                          r"weight\.absmax_scale must have shape"),
    "absmax_offset missing": ("nf4-nested", lambda q: {"absmax_offset": None}, ValueError,
                              r"weight\.absmax_offset is missing"),
    "absmax device": ("nf4", lambda q: {"absmax": q.absmax.to(_OTHER_DEVICE)}, ValueError,
                      rf"weight\.absmax .*is on {_OTHER_DEVICE}"),
    "absmax_code device": ("nf4-nested", lambda q: {"absmax_code": q.absmax_code.to(_OTHER_DEVICE)}, ValueError,
                           rf"weight\.absmax_code .*is on {_OTHER_DEVICE}"),
    "int8 data dtype": ("int8", lambda q: {"data": q.data.to(torch.int16)}, TypeError, r"weight\.data has dtype"),
    "int8 absmax size": ("int8", lambda q: {"absmax": torch.ones(30, device=q.absmax.device)}, ValueError,
                         r"weight\.absmax must have shape \(29,\)"),
    "int8 data device": ("int8", lambda q: {"data": q.data.to(_OTHER_DEVICE)}, ValueError,
                         rf"weight\.data .*is on {_OTHER_DEVICE}"),
    "int8 absmax strided": ("int8", lambda q: {"absmax": torch.stack([q.absmax, q.absmax], 1)[:, 0]}, ValueError,
                            r"weight\.absmax must be contiguous"),
    "uint8 absmax without its tables": ("nf4-nested", lambda q: {"absmax_code": None, "absmax_scale": None,
                                                                  "absmax_offset": None},
                                        TypeError, r"weight\.absmax has dtype torch\.uint8.*absmax_code"),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_raises_naming_the_field(case):
    fmt, change, error, match = MISUSE[case]
    x, _, A, B, _ = make_inputs((4,), 45, 29, 3, torch.float32, {})
    with pytest.raises(error, match=match):
        lk.lora_linear(x, _bad(fmt, change), A, B, 1.0)


def _torchao_int8_weight(N, K):
    quantization = pytest.importorskip("torchao.quantization")
    layer = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False))
    quantization.quantize_(layer, quantization.Int8WeightOnlyConfig())
    return layer[0].weight.detach()


def test_raw_torchao_weight_is_refused_with_the_way_out():
    w = _torchao_int8_weight(29, 45)
    x, _, A, B, _ = make_inputs((4,), 45, 29, 3, torch.float32, {})
    with pytest.raises(TypeError, match=r"tensor subclass.*QuantizedWeight\('subclass'"):
        lk.lora_linear(x, w, A, B, 1.0)


@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
def test_torchao_subclass_matches_its_dequantized_weight(x_grad):
    """A torchao weight, given as a ``"subclass"`` QuantizedWeight, gives the outputs and gradients of its dequantized
    matrix taken as a dense base, whether or not dX is needed (without it, W is not dequantized in the backward)."""
    w = _torchao_int8_weight(29, 45)
    x, _, A, B, kw = make_inputs((7,), 45, 29, 3, torch.float32, {})
    outs = []
    for weight in (QuantizedWeight("subclass", w, (29, 45)), w.dequantize().float()):
        xi, Ai, Bi = (t.detach().clone().requires_grad_(g) for t, g in ((x, x_grad), (A, True), (B, True)))
        y = lk.lora_linear(xi, weight, Ai, Bi, 0.5)
        y.square().sum().backward()
        outs.append([y, Ai.grad, Bi.grad] + ([xi.grad] if x_grad else []))
    for name, got, want in zip(["y", "dA", "dB", "dx"], *outs):
        torch.testing.assert_close(got, want, msg=name)


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_matches_reference_gpu(fmt):
    x, qw, A, B, kw = _inputs(fmt, ((3, 67), 199, 151, 9), torch.bfloat16, FEATURES["all"])
    run_and_compare("triton", x, qw, A, B, kw, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", ["nf4", "nf4-nested", "int8"])
def test_gpu_table_tiles(fmt, dtype):
    """A shape many GPU tiles wide at the GPU tables' quantized tiles (bf16: tensor-core tiles, K steps of 32 and
    128; fp32: the FMA tiles), K a multiple of no block, N·K odd, bitsandbytes' block sizes."""
    x, qw, A, B, kw = _inputs(fmt, ((300,), 999, 515, 16), dtype, FEATURES["all"], absmax_blocksize=256)
    run_and_compare("triton", x, qw, A, B, kw, dtype)


def _last_rows(qw: QuantizedWeight, n0: int) -> QuantizedWeight:
    """Rows n0… of ``qw`` as a QuantizedWeight of views (4-bit: n0·K must start a byte, a block and, nested, a
    block of block scales)."""
    N, K = qw.shape
    if qw.format == "int8":
        return dataclasses.replace(qw, data=qw.data[n0:], absmax=qw.absmax[n0:], shape=(N - n0, K))
    e0 = n0 * K
    b0 = e0 // qw.blocksize
    assert e0 % 2 == 0 and e0 % qw.blocksize == 0 and (not qw.nested or b0 % qw.absmax_blocksize == 0)
    rows = dict(data=qw.data[e0 // 2:], absmax=qw.absmax[b0:], shape=(N - n0, K))
    if qw.nested:
        rows["absmax_scale"] = qw.absmax_scale[b0 // qw.absmax_blocksize:]
    return dataclasses.replace(qw, **rows)


def _check_last_rows(fmt: str, N: int, K: int, tail: int, dtype: torch.dtype, absmax_blocksize: int) -> None:
    """Y's last ``tail`` columns, and dX from a dY that is nonzero only there, against the float64 reference on the
    last ``tail`` rows of W alone (so W itself may be too large to dequantize)."""
    qw = make_quantized(fmt, N, K, absmax_blocksize=absmax_blocksize)
    x = (torch.randn(16, K, device=DEVICE) / 4).to(dtype).requires_grad_(True)
    A = (torch.randn(8, K, device=DEVICE) / math.sqrt(K)).to(dtype).requires_grad_(True)
    B = torch.randn(N, 8, device=DEVICE).to(dtype).requires_grad_(True)
    with _no_dense_weight("triton"), lk.backend.use("triton"):
        y = lk.lora_linear(x, qw, A, B, 0.5)
        dy = torch.zeros_like(y)
        dy[:, -tail:] = torch.randn(16, tail, device=DEVICE).to(dtype)
        y.backward(dy)
    W = reference.dequantize(_last_rows(qw, N - tail))
    x64, A64, B64, dy64 = f64(x), f64(A), f64(B[-tail:]), f64(dy[:, -tail:])
    y_ref = reference.lora_linear(x64, W, A64, B64, 0.5)
    y_ref.backward(dy64)
    y_mag = x64.abs() @ (W.abs() + 0.5 * (B64.abs() @ A64.abs())).t()
    assert_close(y[:, -tail:], y_ref, dtype, "y (last rows of W)", magnitude=y_mag)
    dx_mag = dy64.abs() @ (W.abs() + 0.5 * (B64.abs() @ A64.abs()))
    assert_close(x.grad, x64.grad, dtype, "dx (last rows of W)", magnitude=dx_mag)


@pytest.mark.parametrize("fmt", ["nf4-nested", "int8"])
def test_last_rows_check(fmt):
    """The check of the test below, at a size the interpreter runs (and it can fail: the rows are not all zero)."""
    _check_last_rows(fmt, 40, 256, 3, torch.float32, absmax_blocksize=4)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nf4-nested", "int8"])
def test_gpu_offsets_past_2_to_the_31(fmt):
    """N·K = 2³¹ + 65536 elements (1 GiB of nf4 bytes, 2 GiB of int8): the last rows of W lie past any 32-bit
    element offset."""
    _check_last_rows(fmt, 65538, 32768, 3, torch.bfloat16, absmax_blocksize=256)
