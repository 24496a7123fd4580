"""covariance_update against the float64 reference, on both backends (Triton under the interpreter on CPU)."""
import pytest
import torch

import loranull_kernels.backend as backend
from loranull_kernels import reference
from loranull_kernels.ops.covariance import covariance_update
from tests.helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BACKENDS = ["triton", "torch"]
CPU_DTYPES = [torch.float32, torch.float16]
# Odd sizes: not multiples of any block size, several tiles per dim under the interpreter's 16×16 tiles.
SHAPES = [(53, 37), (3, 7, 29), (2, 3, 5, 19), (1, 1)]


def _sym(n, device=DEVICE):
    a = torch.randn(n, n, device=device)
    return a + a.t()


def _x(shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# Half-precision inputs give exact fp32 products, so every dtype is held to the fp32 tolerance of the accumulation.
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(backend_name, dtype, shape, masked):
    x = _x(shape, dtype)
    mask = torch.rand(shape[:-1], device=DEVICE) > 0.4 if masked else None
    C0 = _sym(shape[-1])
    C = C0.clone()
    with backend.use(backend_name):
        out = covariance_update(C, x, mask)
    assert out is C
    assert_close(C, reference.covariance_update(C0, x, mask), torch.float32, "C")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_streaming_equals_one_pass(backend_name):
    xs = [_x((n, 23), torch.float32) for n in (5, 17, 1, 40)]
    C = torch.zeros(23, 23, device=DEVICE)
    with backend.use(backend_name):
        for x in xs:
            covariance_update(C, x)
    assert_close(C, reference.covariance_update(torch.zeros(23, 23), torch.cat(xs)), torch.float32, "C")


def test_triton_result_exactly_symmetric():
    x = _x((61, 45), torch.float16)
    C = _sym(45)
    with backend.use("triton"):
        covariance_update(C, x)
    assert torch.equal(C, C.t())


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_wide_layer(backend_name):
    x = _x((2, 9, 389), torch.float32)  # 25 tiles per dim under the interpreter
    C0 = _sym(389)
    C = C0.clone()
    with backend.use(backend_name):
        covariance_update(C, x)
    assert_close(C, reference.covariance_update(C0, x), torch.float32, "C")


def test_triton_backend_runs_the_kernel(monkeypatch):
    from loranull_kernels.ops.covariance import triton_backend as kernel

    calls = []
    real = kernel.covariance_update
    monkeypatch.setattr(kernel, "covariance_update", lambda *a: (calls.append(1), real(*a)))
    with backend.use("triton"):
        covariance_update(torch.zeros(9, 9, device=DEVICE), _x((4, 9), torch.float32))
    with backend.use("torch"):
        covariance_update(torch.zeros(9, 9, device=DEVICE), _x((4, 9), torch.float32))
    assert len(calls) == 1


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_strided_x_read_in_place(backend_name):
    big = _x((3, 11, 50), torch.float32)
    x = big[:, :, 7:7 + 33]  # row stride 50, not 33
    y = big.transpose(0, 1)[:, :, :33]  # leading dims permuted
    for inp in (x, y):
        C = torch.zeros(33, 33, device=DEVICE)
        with backend.use(backend_name):
            covariance_update(C, inp)
        assert_close(C, reference.covariance_update(torch.zeros(33, 33), inp), torch.float32, "C")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_masked_tokens_never_read(backend_name):
    x = _x((4, 9, 21), torch.float32)
    mask = torch.rand(4, 9, device=DEVICE) > 0.5
    mask[0, 0] = True
    x[~mask] = float("nan")  # padding full of NaN must not reach C
    C = torch.zeros(21, 21, device=DEVICE)
    with backend.use(backend_name):
        covariance_update(C, x, mask)
    assert_close(C, reference.covariance_update(torch.zeros(21, 21), x, mask), torch.float32, "C")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_nothing_to_add_leaves_C_unchanged(backend_name):
    C0 = _sym(13)
    C = C0.clone()
    with backend.use(backend_name):
        covariance_update(C, _x((6, 13), torch.float32), torch.zeros(6, dtype=torch.bool, device=DEVICE))
        covariance_update(C, _x((0, 13), torch.float32))
    assert torch.equal(C, C0)


def test_float64_input_through_fallback():
    x = torch.randn(2, 15, 17, dtype=torch.float64, device=DEVICE)
    C = torch.zeros(17, 17, device=DEVICE)
    covariance_update(C, x)  # auto: Triton does not take float64
    assert_close(C, reference.covariance_update(torch.zeros(17, 17), x), torch.float32, "C")


def test_input_requiring_grad_is_fine():
    x = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    C = torch.zeros(8, 8, device=DEVICE)
    covariance_update(C, x)
    assert not C.requires_grad
    assert_close(C, reference.covariance_update(torch.zeros(8, 8), x), torch.float32, "C")


@pytest.mark.parametrize(
    "make, exc, word",
    [
        (lambda: (torch.zeros(4, 5), torch.randn(2, 4), None), ValueError, "C"),
        (lambda: (torch.zeros(4, 4, 1), torch.randn(2, 4), None), ValueError, "C"),
        (lambda: (torch.zeros(4, 4, dtype=torch.float64), torch.randn(2, 4), None), TypeError, "C must be float32"),
        (lambda: (torch.zeros(4, 4), torch.randn(2, 5), None), ValueError, "x's last dim"),
        (lambda: (torch.zeros(4, 4), torch.ones(2, 4, dtype=torch.int32), None), TypeError, "x must be"),
        (lambda: (torch.zeros(4, 4), torch.randn(2, 4), torch.ones(2, dtype=torch.float32)), TypeError, "token_mask"),
        (lambda: (torch.zeros(4, 4), torch.randn(2, 4), torch.ones(3, dtype=torch.bool)), ValueError, "token_mask"),
        (lambda: (torch.zeros(4, 4), torch.randn(2, 4, device="meta"), None), ValueError, "device"),
        (lambda: ([[0.0]], torch.randn(2, 1), None), TypeError, "C must be"),
    ],
)
def test_bad_input_raises_naming_the_argument(make, exc, word):
    C, x, mask = make()
    with pytest.raises(exc, match=word):
        covariance_update(C, x, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_large_odd_shape(dtype):
    x = torch.randn(3, 1000, 777, device="cuda").to(dtype)
    mask = torch.rand(3, 1000, device="cuda") > 0.1
    C0 = _sym(777, "cuda")
    C = C0.clone()
    with backend.use("triton"):
        covariance_update(C, x, mask)
    assert torch.equal(C, C.t())
    assert_close(C, reference.covariance_update(C0, x, mask), torch.float32, "C", tol=1e-5)
