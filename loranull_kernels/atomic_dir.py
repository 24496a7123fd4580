"""Write a directory atomically: into a temporary directory beside the target, then renamed into place, one writer
at a time (an ``flock`` on the parent). A process killed at any point leaves the previous directory (or none) at the
target, never a half-written one; what a killed write left is put back or deleted by the next write or read."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path


def target_path(path, what: str) -> Path:
    """``path`` resolved (symlinks followed), refused when replacing it would move the working directory away."""
    try:
        resolved = Path(os.path.realpath(os.fspath(path)))
    except TypeError:
        raise TypeError(f"{what}: path must be a str or os.PathLike, got {type(path).__name__}") from None
    cwd = Path(os.path.realpath(os.getcwd()))
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"{what}: path {os.fspath(path)!r} is the current working directory or one of its parents "
                         f"({resolved}); the adapter directory is replaced as a whole: name a subdirectory")
    return resolved


@contextlib.contextmanager
def locked_parent(path: Path):
    """An exclusive advisory lock (``flock``) on ``path``'s parent directory while saving or recovering: one
    writer at a time, and a writer that dies releases it. No lock where ``fcntl`` is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; saves there are not protected against each other
        yield
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """The ``(tmp, old)`` directories killed saves of ``path`` left beside it (mkdtemp names: 8 random chars)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    found: dict[str, list[Path]] = {"tmp": [], "old": []}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            m = pattern.fullmatch(entry.name)
            if m and entry.is_dir(follow_symlinks=False):
                found[m.group(1)].append(Path(entry.path))
    return found["tmp"], found["old"]


def recover(path: Path) -> None:
    """Undo what a killed save left (call with the parent locked). A save killed between moving the previous
    adapter aside and renaming the new one into place leaves no ``path``: the previous adapter is moved back (the
    interrupted save did not happen). Unfinished temporary directories and the leftovers of finished saves are
    deleted."""
    tmps, olds = leftovers(path)
    if not os.path.lexists(path):
        for old in sorted(olds, key=lambda d: d.stat().st_mtime, reverse=True):
            if (old / path.name).is_dir():
                os.rename(old / path.name, path)
                break
    for d in tmps + olds:
        shutil.rmtree(d, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # make renames durable where directories can be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, allowed: tuple[str, ...], what: str):
    """Yield a fresh temporary directory beside ``path``; on success rename it to ``path`` (replacing a previous
    directory that holds only ``allowed`` files); on error delete it and leave ``path`` untouched.

    A process killed at any point leaves the previous directory at ``path`` or beside it, in
    ``.<name>.old-*/<name>``; the next save or load of ``path`` puts it back (:func:`recover`)."""
    path = target_path(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked_parent(path):
        recover(path)
        if os.path.lexists(path):
            if not path.is_dir():
                raise FileExistsError(f"{path} exists and is not a directory")
            extra = sorted(set(os.listdir(path)) - set(allowed))
            if extra:
                raise FileExistsError(f"{path} exists and holds other files ({extra[:5]}); refusing to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if os.path.lexists(path):
                old_root = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.rename(path, old_root / path.name)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old_root / path.name, path)
                    raise
                _fsync_dir(path.parent)
                shutil.rmtree(old_root, ignore_errors=True)
            else:
                os.rename(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
