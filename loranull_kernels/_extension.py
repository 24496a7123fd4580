"""The optional CUDA extension ``loranull_kernels._C`` (csrc/): load it, JIT-build it, or say why it is unavailable.

Order: the module built by ``setup.py`` (``pip install --no-build-isolation -e .`` on a CUDA machine); else, on a
machine with a CUDA build of torch, a GPU, nvcc and ninja, a JIT build with ``torch.utils.cpp_extension.load`` on
first use (a minute or two, cached in torch's extensions directory afterwards); else nothing, and callers run their
PyTorch implementation. Nothing here raises because a compiler or an accelerator is missing.

``LORANULL_NO_EXTENSION=1`` disables both the import and the JIT build; ``LORANULL_VERBOSE_BUILD=1`` shows the
compiler's output.

This file imports only the standard library and torch at the top: ``setup.py`` loads it by path to find the CUDA
math libraries to link.
"""
from __future__ import annotations

import glob
import os
import site
import sys
import threading
from pathlib import Path

import torch

_JIT_NAME = "loranull_kernels_C"
_LIBRARIES = ("cublas", "cusolver")

_lock = threading.Lock()
_module = None
_how: str | None = None  # "built" or "JIT-built", once loaded
_failure: str | None = None  # why loading failed, once tried


def _disabled() -> bool:
    return os.environ.get("LORANULL_NO_EXTENSION", "0").strip() not in ("", "0")


def csrc_dir() -> Path:
    """The extension's sources: ``csrc/`` of the checkout this package lives in."""
    return Path(__file__).resolve().parent.parent / "csrc"


def sources() -> list[str]:
    d = csrc_dir()
    return sorted(str(p) for p in list(d.glob("*.cpp")) + list(d.glob("*.cu")))


def math_library_link_args(cuda_home: str | None) -> list[str]:
    """Linker arguments for cuBLAS and cuSOLVER.

    A full CUDA toolkit has ``libcublas.so`` in ``$CUDA_HOME/lib64``; pip-installed CUDA (what CUDA builds of torch
    depend on) ships only ``libcublas.so.13`` under ``site-packages/nvidia/*/lib``, where ``-lcublas`` finds
    nothing: link those files by path, with an rpath so the loader finds them again.
    """
    args: list[str] = []
    roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if p]
    for lib in _LIBRARIES:
        toolkit = [Path(cuda_home, d, f"lib{lib}.so") for d in ("lib64", "lib")] if cuda_home else []
        found = next((p for p in toolkit if p.exists()), None)
        if found is not None:
            args += [f"-L{found.parent}", f"-l{lib}"]
            continue
        wheel = sorted(q for r in roots for q in glob.glob(os.path.join(r, "nvidia", "*", "lib", f"lib{lib}.so*")))
        if wheel:
            args += [wheel[-1], f"-Wl,-rpath,{Path(wheel[-1]).parent}"]
        # else: leave it to the process, where torch's CUDA build has already loaded these libraries globally
    return args


def jit_unavailable_reason() -> str | None:
    """None when a JIT build can be attempted here, else why not."""
    if _disabled():
        return "disabled by LORANULL_NO_EXTENSION=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if not sources():
        return f"the extension's sources are not in {csrc_dir()} (installed without the checkout)"
    return None


def _import_built():
    from . import _C  # noqa: F401  (the module setup.py builds)

    return _C


def _jit_build():
    from torch.utils import cpp_extension

    verbose = os.environ.get("LORANULL_VERBOSE_BUILD", "0") not in ("", "0")
    return cpp_extension.load(
        name=_JIT_NAME,
        sources=sources(),
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        extra_ldflags=math_library_link_args(cpp_extension.CUDA_HOME),
        verbose=verbose,
    )


def load():
    """The extension module, building it on first use when possible; None when unavailable (see :func:`status`)."""
    global _module, _how, _failure
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        if _disabled():
            _failure = "disabled by LORANULL_NO_EXTENSION=1"
            return None
        try:
            _module, _how = _import_built(), "built"
            return _module
        except Exception as exc:  # not built, or built against another torch: try the JIT build
            import_error = f"{type(exc).__name__}: {exc}"
        why_not = jit_unavailable_reason()
        if why_not is not None:
            _failure = f"not built ({import_error}) and cannot be JIT-built: {why_not}"
            return None
        try:
            print("loranull_kernels: JIT-building the CUDA extension (once; cached afterwards) ...", file=sys.stderr)
            _module, _how = _jit_build(), "JIT-built"
        except Exception as exc:  # a compiler error must not take the caller down: the PyTorch path still works
            _failure = f"JIT build failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})"
        return _module


def available() -> bool:
    """True when the extension is (or can now be made) importable; may trigger the JIT build."""
    return load() is not None


def status() -> str:
    """One line on the extension, without starting a build."""
    if _module is not None:
        return f"{_how} ({getattr(_module, '__file__', _JIT_NAME)})"
    if _failure is not None:
        return f"unavailable: {_failure}; the PyTorch implementations run instead"
    if _disabled():
        return "unavailable: disabled by LORANULL_NO_EXTENSION=1; the PyTorch implementations run instead"
    try:
        import importlib.util

        if importlib.util.find_spec(f"{__package__}._C") is not None:
            return "built (not loaded yet)"
    except Exception:
        pass
    why_not = jit_unavailable_reason()
    if why_not is None:
        return "not built; will be JIT-built with ninja on first use"
    return f"unavailable: not built, and cannot be JIT-built here ({why_not}); the PyTorch implementations run instead"
