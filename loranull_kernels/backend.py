"""The registry of backends, and the one dispatch every op uses: which implementation of an op runs.

:data:`BACKENDS` names every backend with the function that says where it cannot run: ``"triton"`` (the Triton
kernels), ``"cuda"`` (the compiled CUDA extension ``_C``, :mod:`._extension`) and ``"torch"`` (PyTorch, runs
everywhere: every op's fallback). Each op lists the backends it has, most preferred first (its
``IMPLEMENTATIONS``), and asks :func:`select` which one runs. Selection, in order of precedence:

1. :func:`use` (a context manager, for tests and benchmarks that compare backends);
2. the environment variable ``LORANULL_BACKEND`` = ``auto`` | ``triton`` | ``cuda`` | ``torch``;
3. ``auto``: the op's first backend that can run on the tensors: Triton for CUDA tensors, and for CPU tensors when
   ``TRITON_INTERPRET=1`` (Triton's interpreter, how CI tests every kernel without a GPU); the CUDA extension for
   CUDA tensors when it is built or can be JIT-built; the PyTorch fallback everywhere else, and for dtypes the
   Triton kernels do not take (float64).

A requested backend that an op does not have counts as ``auto`` for that op (``triton`` still lets ``rsvd`` use
the CUDA extension); one that it has but that cannot run here raises. ``report()`` prints what is available on
this machine and why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Callable, Iterator

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DTYPES = TRITON_DTYPES + (torch.float64,)

_override: str | None = None


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


_TRITON_IMPORT = {}  # a plain cache: dynamo would trace through functools.lru_cache


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once at trace time, not traced
def triton_import_error() -> str | None:
    """None when ``import triton`` works, else the reason it does not."""
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORT["error"] = None
        except Exception as exc:  # any failure (missing wheel, broken driver libs) means: no Triton
            _TRITON_IMPORT["error"] = f"{type(exc).__name__}: {exc}"
    return _TRITON_IMPORT["error"]


def requested() -> str:
    """The backend asked for: the active :func:`use` override, else ``LORANULL_BACKEND``, else ``"auto"``."""
    if _override is not None:
        return _override
    name = os.environ.get("LORANULL_BACKEND", "auto").strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"LORANULL_BACKEND={name!r}: expected one of {_CHOICES}")
    return name


def triton_unusable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when the Triton kernels can run on tensors of this device and dtype, else why not."""
    err = triton_import_error()
    if err is not None:
        return f"triton cannot be imported ({err})"
    if device.type == "cpu":
        if not interpreting():
            return ("the Triton kernels need a GPU (CPU tensors run the torch backend; Triton's interpreter, "
                    "TRITON_INTERPRET=1, runs them on the CPU for tests only: it is slow)")
    elif device.type != "cuda":
        return f"Triton kernels do not run on {device.type!r} tensors"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return f"the Triton kernels take {', '.join(str(d) for d in TRITON_DTYPES)}, not {dtype}"
    return None


def cuda_unusable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when the CUDA extension ``_C`` can run on tensors of this device, else why not (may JIT-build it)."""
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors, not {device.type!r} ones"
    from . import _extension

    return None if _extension.available() else f"the CUDA extension is {_extension.status()}"


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: its name and ``unusable_reason(device, dtype)``, None where it can run, else why not."""

    name: str
    unusable_reason: Callable[[torch.device, torch.dtype | None], str | None]


BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", triton_unusable_reason),
    "cuda": Backend("cuda", cuda_unusable_reason),
    "torch": Backend("torch", lambda device, dtype=None: None),
}
_CHOICES = ("auto",) + tuple(BACKENDS)


def select(device: torch.device, dtype: torch.dtype | None = None,
           among: tuple[str, ...] = ("triton", "torch")) -> str:
    """The backend that will run an op on tensors of ``device`` / ``dtype``.

    Args:
        among: the op's backends, most preferred first, ending with ``"torch"`` (an op's ``IMPLEMENTATIONS``); the
            default is that of the ops with a Triton implementation.
    Raises:
        RuntimeError: a backend of ``among`` was requested explicitly but cannot run here (the message says why).
    """
    req = requested()
    if req == "torch":
        return "torch"
    device = torch.device(device)
    if req in among:
        why = BACKENDS[req].unusable_reason(device, dtype)
        if why is not None:
            raise RuntimeError(f"backend {req!r} was requested but {why}")
        return req
    for name in among[:-1]:
        if BACKENDS[name].unusable_reason(device, dtype) is None:
            return name
    return among[-1]


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Force a backend (``"triton"``, ``"cuda"``, ``"torch"`` or ``"auto"``) inside a ``with`` block.

    Not thread-local: meant for tests, benchmarks and scripts, not for concurrent use.
    """
    global _override
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def poisoning() -> bool:
    """True when ``LORANULL_POISON_OUTPUTS=1``: kernels fill their output buffers with NaN before writing them, so a
    test fails on any element a kernel forgot to write (tests set it; never needed in production)."""
    return os.environ.get("LORANULL_POISON_OUTPUTS", "0") not in ("", "0")


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled under :func:`poisoning` (integer outputs: their max value)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max)
    return out


def extension_status() -> str:
    """One line on the optional CUDA extension ``loranull_kernels._C`` (never starts a build)."""
    from . import _extension

    return _extension.status()


def report(file=None) -> str:
    """Print (to ``file``, default stdout) and return what is available here and which backend runs where."""
    lines = [
        f"loranull_kernels backends (requested: {requested()})",
        f"  torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
    ]
    err = triton_import_error()
    if err is None:
        import triton

        lines.append(f"  triton {triton.__version__}; interpreter (TRITON_INTERPRET): {'on' if interpreting() else 'off'}")
    else:
        lines.append(f"  triton: unavailable ({err})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    reasons: list[str] = []  # each reason printed once, as a footnote, however many rows it explains
    for dev in devices:
        for dtype in SUPPORTED_DTYPES:
            try:
                chosen = select(torch.device(dev), dtype)
                why = triton_unusable_reason(torch.device(dev), dtype)
                if chosen == "torch" and why:
                    reasons += [why] if why not in reasons else []
                    note = f" [{reasons.index(why) + 1}]"
                else:
                    note = ""
            except RuntimeError as exc:
                chosen, note = "error", f" ({exc})"
            lines.append(f"  {dev:4s} {str(dtype):14s} -> {chosen}{note}")
    lines += [f"  [{i + 1}] not Triton: {why}" for i, why in enumerate(reasons)]
    lines.append(f"  CUDA extension _C: {extension_status()}")
    text = "\n".join(lines)
    print(text, file=file or sys.stdout)
    return text
