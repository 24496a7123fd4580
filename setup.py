"""Build plumbing for the optional CUDA extension `loranull_kernels._C` (sources in csrc/).

The extension is built only when, at build time, torch is importable, torch is a CUDA build and a CUDA toolkit is
found (`pip install --no-build-isolation -e .` on a GPU machine). Everywhere else the package installs without it
and `loranull_kernels` either JIT-builds it with ninja on first use (CUDA machines) or runs its PyTorch fallback.
Set LORANULL_NO_EXTENSION=1 to skip the build explicitly.
"""
import glob
import os

from setuptools import setup


def _math_library_link_args(cuda_home):
    """cuBLAS/cuSOLVER link arguments, shared with the JIT build (pip-installed CUDA has no plain libcublas.so)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loranull_kernels", "_extension.py")
    spec = importlib.util.spec_from_file_location("_loranull_extension", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.math_library_link_args(cuda_home)


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources or os.environ.get("LORANULL_NO_EXTENSION", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    ext = CUDAExtension(
        "loranull_kernels._C",
        sources,
        # No -std flag: torch's builder passes the standard its own headers need (c++17, or c++20 on newer torch).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        extra_link_args=_math_library_link_args(CUDA_HOME),
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
