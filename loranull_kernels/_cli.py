"""What every command line of the package shares: plain-text help, arguments checked before any long work, and
exit codes (0 on success, 2 with a one-line message on a bad argument, as argparse does for its own checks).

The console scripts (``loranull-bench``, ``loranull-forgetting``, ``loranull-demo``) and ``python -m
loranull_kernels`` each define ``main(argv) -> result`` (what tests and Python callers use) and ``cli(argv) -> int``
(what the console script runs: ``sys.exit(cli())``; :func:`console_script` makes it), so a successful run never
exits with its result as status.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Callable

import torch


def console_script(main: Callable[[list[str] | None], object], prog: str) -> Callable[[list[str] | None], int]:
    """The ``cli(argv=None) -> int`` of a command from its ``main(argv) -> result``: runs ``main`` and returns 0, so
    that the console script (``sys.exit(cli())``) exits 0 after a success, whatever ``main`` returned."""

    def cli(argv: list[str] | None = None) -> int:
        main(argv)
        return 0

    cli.__doc__ = f"The ``{prog}`` console script: exit status 0 on success."
    return cli


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that keeps the description's line breaks (it is written as plain text) and reports
    a bad argument in one line."""

    def __init__(self, prog: str, description: str, epilog: str | None = None):
        super().__init__(prog=prog, description=description, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        """One line on stderr and exit status 2 (argparse's default prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def plain(docstring: str) -> str:
    """A module docstring as plain text for ``--help``: reST roles and literals (:mod:`x`, ``y``) unwrapped."""
    text = re.sub(r":[a-z]+:`~?\.?([^`]+)`", r"\1", docstring)
    return text.replace("``", "").strip()


def probability(text: str) -> float:
    """argparse type: a float in [0, 1) (a dropout probability)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1)")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = _number(text, float)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int ≥ 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not ≥ 1")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an int ≥ 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not ≥ 0")
    return value


def device(text: str) -> torch.device:
    """argparse type: ``cpu`` or a CUDA device that exists here (``cuda``, ``cuda:1``)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return dev


def unwritable_dir(path, option: str) -> str | None:
    """Why the folder ``path`` (given as ``option``, or its default) cannot receive the command's files, or None:
    checked before any work, so that a long run does not end on a file where the folder should be. Nothing is
    created here: the first existing folder on the way must be writable, and nothing on the way may be a file."""
    target = Path(path).expanduser()
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "" if existing == target else f" ({existing} is a file)"
        return f"{option} {str(path)!r}: not a folder{where}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {str(path)!r}: {existing} is not writable"
    return None


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}") from None
