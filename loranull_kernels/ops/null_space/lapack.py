"""LAPACK's Cholesky factorisation (``?potrf``) in place, called through the BLAS/LAPACK that torch itself links.

Why not ``torch.linalg.cholesky_ex``: on the CPU it first copies A into a new column-major L with a
single-threaded ``tril`` and only then calls ``potrf``. Measured on the project's CPU (2-core AMD EPYC, MKL,
n = 4096, float32): 146 ms in ``potrf`` and 66 ms in that copy, plus a second n × n buffer (970 MB at n = 11008 in
float64). Calling ``potrf`` on the solver's own working copy, in place, costs the 146 ms and no buffer.

torch's CPU wheels link MKL statically and export its LAPACK symbols (``spotrf_`` / ``dpotrf_``, 32-bit integers).
Where they are missing (other builds) or give a wrong answer on a small check (say an ILP64 library),
:func:`available` is False and the caller falls back to ``torch.linalg.cholesky_ex``.

Layout: a row-major (C-contiguous) n × n matrix is, to Fortran, its transpose. Asking for the *upper* factor U of
that view (``Aᵀ = UᵀU``) leaves in memory, read row-major, the lower factor L = Uᵀ with ``A = L Lᵀ`` (A symmetric):
the lower triangle of the row-major matrix is read and overwritten, the strict upper triangle is left as it was.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

_SYMBOLS = {torch.float32: "spotrf_", torch.float64: "dpotrf_"}


@functools.lru_cache(maxsize=None)
def _routines() -> dict | None:
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = lib_dir / name
        if not path.exists():
            continue
        try:
            lib = ctypes.CDLL(str(path))
            found = {dtype: getattr(lib, symbol) for dtype, symbol in _SYMBOLS.items()}
        except (OSError, AttributeError):
            return None
        for fn in found.values():
            fn.restype = None
        return found
    return None


def _call(A: torch.Tensor) -> int:
    n = ctypes.c_int(A.shape[-1])
    info = ctypes.c_int(0)
    _routines()[A.dtype](ctypes.byref(ctypes.c_char(b"U")), ctypes.byref(n), ctypes.c_void_p(A.data_ptr()),
                         ctypes.byref(n), ctypes.byref(info))
    return info.value


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the in-place LAPACK path works in this process: the symbols were found and they factor a small
    matrix to within rounding of ``torch.linalg.cholesky_ex`` (and report a non-PD one as failing)."""
    if _routines() is None:
        return False
    g = torch.Generator().manual_seed(0)
    for dtype in _SYMBOLS:
        X = torch.randn(40, 37, generator=g, dtype=torch.float64)
        A = (X.t() @ X + torch.eye(37, dtype=torch.float64)).to(dtype)
        want = torch.linalg.cholesky(A)
        got = A.clone()
        if _call(got) != 0 or not torch.allclose(got.tril(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            return False
        if _call(-A.clone()) == 0:
            return False
    return True


def supports(A: torch.Tensor) -> bool:
    """Whether :func:`potrf_` can factor ``A`` in place: a CPU, C-contiguous float32/float64 (…, n, n) tensor, and
    :func:`available`."""
    return (A.device.type == "cpu" and A.dtype in _SYMBOLS and A.dim() >= 2 and A.shape[-1] == A.shape[-2]
            and A.is_contiguous() and A.shape[-1] < 2 ** 31 and available())


def potrf_(A: torch.Tensor) -> int:
    """Factor the symmetric positive definite ``A`` (n, n) in place: on success its lower triangle holds the lower
    Cholesky factor L (``A = L Lᵀ``) and its strict upper triangle is unchanged (not zeroed).

    Args:
        A: (n, n) C-contiguous float32 or float64 CPU tensor (:func:`supports`); only its lower triangle is read.
    Returns:
        LAPACK's info: 0 on success, ``j > 0`` when the leading minor of order j is not positive definite (A's
        lower triangle is then partly overwritten).
    """
    if not supports(A) or A.dim() != 2:
        raise ValueError(f"potrf_ needs a C-contiguous (n, n) float32/float64 CPU tensor and LAPACK; got "
                         f"{tuple(A.shape)} {A.dtype} on {A.device}, contiguous={A.is_contiguous()}")
    return _call(A)
