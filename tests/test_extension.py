"""The optional CUDA extension: how it is found and reported (any machine), and its results (CUDA only)."""
import pytest
import torch

import loranull_kernels.backend as backend
from loranull_kernels import _extension, reference
from loranull_kernels.ops.rsvd import rsvd
from loranull_kernels.ops.rsvd.torch_backend import rsvd as rsvd_torch


@pytest.fixture
def fresh_extension_state(monkeypatch):
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_failure", None)
    monkeypatch.setattr(_extension, "_how", None)


def test_status_is_one_line_and_never_raises():
    for line in (_extension.status(), backend.extension_status()):
        assert isinstance(line, str) and line and "\n" not in line


def test_sources_are_found():
    names = {p.rsplit("/", 1)[-1] for p in _extension.sources()}
    assert {"bindings.cpp", "rsvd_cuda.cu", "nullspace_cuda.cu"} <= names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_unavailable_and_says_why(fresh_extension_state):
    assert _extension.load() is None
    assert not _extension.available()
    line = _extension.status()
    assert line.startswith("unavailable") and "PyTorch implementations run instead" in line
    assert _extension.jit_unavailable_reason() is not None
    U, S, Vh = rsvd(torch.randn(12, 10), 3, seed=0)  # still works, through PyTorch
    assert S.shape == (3,)


def test_disabled_by_environment(monkeypatch, fresh_extension_state):
    monkeypatch.setenv("LORANULL_NO_EXTENSION", "1")
    assert _extension.load() is None
    assert "LORANULL_NO_EXTENSION" in _extension.status()


def test_link_args_prefer_a_toolkit_library(tmp_path):
    (tmp_path / "lib64").mkdir()
    for lib in ("cublas", "cusolver"):
        (tmp_path / "lib64" / f"lib{lib}.so").touch()
    assert _extension.math_library_link_args(str(tmp_path)) == [
        f"-L{tmp_path / 'lib64'}", "-lcublas", f"-L{tmp_path / 'lib64'}", "-lcusolver"]


def test_link_args_fall_back_to_pip_wheels(tmp_path, monkeypatch):
    lib_dir = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    lib_dir.mkdir(parents=True)
    for lib in ("cublas", "cusolver"):
        (lib_dir / f"lib{lib}.so.13").touch()
    monkeypatch.setattr(_extension.site, "getsitepackages", lambda: [str(tmp_path / "site")])
    monkeypatch.setattr(_extension.site, "getusersitepackages", lambda: "")
    args = _extension.math_library_link_args(str(tmp_path / "no-toolkit"))
    assert args == [str(lib_dir / "libcublas.so.13"), f"-Wl,-rpath,{lib_dir}",
                    str(lib_dir / "libcusolver.so.13"), f"-Wl,-rpath,{lib_dir}"]


# ---- CUDA only: the extension against the PyTorch implementation of the same steps ------------------------------

def _known(B, m, n, device="cuda"):
    s = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(B, m, min(m, n), dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(B, n, min(m, n), dtype=torch.float64)).Q
    return ((U * s) @ V.transpose(-1, -2)).float().to(device), s


@pytest.mark.gpu
def test_gpu_extension_loads():
    assert _extension.available(), _extension.status()
    assert _extension.status().startswith(("built", "JIT-built"))


@pytest.mark.gpu
@pytest.mark.parametrize("B, m, n, rank, k, shared", [(1, 301, 257, 20, 0, True), (5, 120, 199, 9, 13, True),
                                                      (3, 257, 130, 16, 7, False)])
def test_gpu_extension_matches_torch_path(B, m, n, rank, k, shared):
    M, _ = _known(B, m, n)
    Q = torch.linalg.qr(torch.randn(1 if shared else B, n, k, device="cuda")).Q.contiguous() if k else None
    l = rank + 10
    omega = torch.randn(B, l, n, device="cuda")
    U, S, Vh = _extension.load().rsvd(M, omega, Q, rank, 2)
    Ut, St, Vht = rsvd_torch(M, omega, Q, rank, 2)
    assert U.shape == (B, m, rank) and S.shape == (B, rank) and Vh.shape == (B, rank, n)
    assert (S - St).abs().max() < 1e-4 * S.max()
    assert ((U * S.unsqueeze(-2)) @ Vh - (Ut * St.unsqueeze(-2)) @ Vht).abs().max() < 1e-4 * S.max()
    assert (U.transpose(-1, -2) @ U - torch.eye(rank, device="cuda")).abs().max() < 1e-4
    if Q is not None:
        assert (Vh @ Q).abs().max() < 1e-4


@pytest.mark.gpu
def test_gpu_dispatch_and_tail_energy():
    M, s = _known(2, 1024, 768)
    U, S, Vh = rsvd(M, 64, seed=0)  # auto on CUDA: the extension
    err = reference.approximation_error(M.cpu().double(), U.cpu(), S.cpu(), Vh.cpu())
    assert torch.all(err <= 1.05 * (s[64:] ** 2).sum())


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream():
    M, _ = _known(2, 200, 150)
    expected = rsvd(M, 8, seed=5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = rsvd(M, 8, seed=5)
    side.synchronize()
    assert (got[1] - expected[1]).abs().max() < 1e-5
