"""The base-weight kinds: which modules each claims, the shapes, the dense and quantized views of their weight,
re-quantization with the layer's own settings, and bitsandbytes' CPU repacking (both layouts, on any CPU)."""
import pytest
import torch
from torch import nn

from loranull_kernels import reference
from loranull_kernels.base_weights import (Bnb4bitLinear, Bnb8bitLinear, DenseLinear, TorchaoLinear, base_weight,
                                           prepare)
from loranull_kernels.targets import is_linear_like, linear_shape

from .quantized_models import repack_for_cpu

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def linear4bit(out_f=64, in_f=128, quant_type="nf4", nested=True, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    m = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
                          quant_type=quant_type)
    m.load_state_dict(lin.state_dict())
    m.weight.data = m.weight.data.to(dtype)
    return m.to("cpu"), lin


def linear8bit(out_f=40, in_f=96, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    m = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False, threshold=6.0)
    m.load_state_dict(lin.state_dict())
    return m.to("cpu"), lin


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_4bit_kind_reads_bitsandbytes_layout(quant_type, nested):
    m, lin = linear4bit(quant_type=quant_type, nested=nested)
    base = base_weight(m)
    assert isinstance(base, Bnb4bitLinear) and is_linear_like(m) and linear_shape(m) == (128, 64)
    q = base.quantized()
    assert q.format == quant_type and q.nested == nested and q.shape == (64, 128)
    assert q.data.data_ptr() == m.weight.data.data_ptr()  # a view, never a copy
    expected = F.dequantize_4bit(m.weight.data, m.weight.quant_state)
    assert torch.equal(base.dense(), expected)
    assert torch.allclose(reference.dequantize(q), expected.double(), rtol=0, atol=1e-6)
    rel = ((base.dense() - lin.weight).norm() / lin.weight.norm()).item()
    assert 0 < rel < 0.2  # a 4-bit rounding of the float weight, not another matrix
    assert base.bias is m.bias and base.compute_dtype(torch.bfloat16) == torch.float32


def test_int8_kind_reads_row_scales_before_and_after_the_first_forward():
    m, lin = linear8bit()
    base = base_weight(m)
    assert isinstance(base, Bnb8bitLinear)
    before = base.dense()
    assert torch.allclose(before, lin.weight, atol=lin.weight.abs().max().item() / 100)
    m(torch.randn(3, 96))  # moves CB / SCB from the weight to module.state
    assert m.weight.SCB is None
    assert torch.equal(base_weight(m).dense(), before)
    assert base.compute_dtype(torch.bfloat16) == torch.bfloat16


def test_torchao_kind_and_dense_kind_do_not_overlap():
    torchao = pytest.importorskip("torchao.quantization")
    seq = nn.Sequential(nn.Linear(96, 40))
    plain = nn.Linear(96, 40)
    seq[0].load_state_dict(plain.state_dict())
    torchao.quantize_(seq, torchao.Int8WeightOnlyConfig())
    base = base_weight(seq[0])
    assert isinstance(base, TorchaoLinear) and base.quantized().format == "subclass"
    assert torch.allclose(base.dense(), plain.weight, atol=plain.weight.abs().max().item() / 100)
    assert "does not record" in base.requantize_refusal()
    assert isinstance(base_weight(plain), DenseLinear)
    for m in (linear4bit()[0], linear8bit()[0]):
        assert not isinstance(base_weight(m), DenseLinear)


def test_a_tensor_subclass_without_its_own_dequantize_is_not_torchao():
    """Every tensor has a dequantize() (identity on float tensors): a bitsandbytes parameter not quantized yet, or any
    wrapper subclass that does not define its own, is not read as a self-dequantizing torchao weight."""
    class Wrapped(torch.Tensor):
        pass

    m = nn.Linear(8, 4)
    m.weight = nn.Parameter(m.weight.detach().as_subclass(Wrapped), requires_grad=False)
    assert not isinstance(base_weight(m), TorchaoLinear)
    bnb = pytest.importorskip("bitsandbytes")
    unquantized = bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=True)  # Int8Params holding float weights
    assert not isinstance(base_weight(unquantized), TorchaoLinear)


def test_integer_nn_linear_of_an_unknown_quantizer_is_not_a_base():
    m = nn.Linear(8, 4)
    m.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    assert base_weight(m) is None and not is_linear_like(m)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_requantize_keeps_the_layers_settings_and_bias(quant_type, nested):
    m, _ = linear4bit(quant_type=quant_type, nested=nested)
    m.compute_dtype = torch.bfloat16
    base = base_weight(m)
    W = base.dense()
    target = W + 0.01 * torch.randn_like(W)
    new = base.requantize(target)
    s_old, s_new = m.weight.quant_state, new.weight.quant_state
    assert type(new) is type(m) and new.bias is m.bias and new.compute_dtype == torch.bfloat16
    assert (s_new.quant_type, s_new.blocksize, s_new.nested, s_new.dtype) == \
        (s_old.quant_type, s_old.blocksize, s_old.nested, s_old.dtype)
    got = base_weight(new).dense()
    # one fresh 4-bit rounding of the target: as close as bitsandbytes' own quantization of it
    own = F.dequantize_4bit(*F.quantize_4bit(target, blocksize=64, compress_statistics=nested, quant_type=quant_type))
    assert torch.equal(got, own)
    assert not new.support_avx512bf16_for_cpu


def test_requantize_int8():
    m, _ = linear8bit()
    base = base_weight(m)
    W = base.dense()
    new = base.requantize(W * 0.5)
    assert isinstance(base_weight(new), Bnb8bitLinear) and new.bias is m.bias
    assert torch.allclose(base_weight(new).dense(), W * 0.5, atol=W.abs().max().item() / 200)


@pytest.mark.parametrize("nested", [False, True])
def test_repacked_cpu_layout_is_unpacked_with_a_warning(nested):
    """bitsandbytes' CPU repacking (eval mode, no grad, AVX512-BF16) changes the layout in place: the kind reads
    the weight back (its scales rounded to bf16 by the repacking) and switches the repacking off."""
    m, _ = linear4bit(nested=nested)
    before = base_weight(m).dense()
    repack_for_cpu(m)
    assert m.weight.quant_state.packing_format_for_cpu
    with pytest.warns(UserWarning, match="repacked"):
        after = base_weight(m).dense()
    assert not m.weight.quant_state.packing_format_for_cpu and not m.support_avx512bf16_for_cpu
    assert ((after - before).norm() / before.norm()).item() < 2 ** -7
    # what bitsandbytes itself computes from the unpacked layout agrees with the kind's view
    x = torch.randn(3, 128)
    assert torch.allclose(m(x), x @ after.t() + m.bias, atol=1e-4)


def test_prepare_switches_repacking_off_before_any_forward():
    m, _ = linear4bit()
    m.support_avx512bf16_for_cpu = True
    prepare([m, nn.Linear(3, 3)])
    assert not m.support_avx512bf16_for_cpu
    with torch.no_grad():
        m(torch.randn(2, 128))
    assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
