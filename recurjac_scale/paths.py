"""Safe paths.

- Paths named inside user-given files (JSON job lists, VNN-LIB specifications) must stay inside the folder they are
  resolved against: ``../../etc/passwd``, an absolute path or a symlink pointing out is refused (`resolve_inside`).
- Output files are replaced atomically through a fresh temporary file in the same folder (`write_atomic`). The
  temporary file is created exclusively under an unpredictable name, so a file or symlink that already sits at a
  predictable name such as ``out.json.tmp`` is never followed or overwritten.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO

from .errors import InputError

__all__ = ["resolve_inside", "write_atomic"]



def _read_umask() -> int:
    """The process umask, without changing it where the kernel reports it (Linux ``/proc/self/status``); elsewhere
    by setting and restoring it, which another thread creating files at that moment could observe."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: files written by `write_atomic` get the permissions a plain ``open(path, "w")`` would give them.
_UMASK = _read_umask()


def resolve_inside(base: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """``base / relative`` resolved (symlinks followed), refused unless it lies inside ``base``.

    Parameters
    ----------
    base : path
        The folder outputs may be written to (e.g. the output directory).
    relative : path
        A path read from a user-given file.

    Returns
    -------
    Path
        The resolved absolute path, inside ``base``.

    Raises
    ------
    InputError
        For an absolute path, or one that escapes ``base`` (``..``, a symlink pointing outside).
    """
    rel = Path(relative)
    if rel.is_absolute():
        raise InputError(f"path {str(relative)!r} is absolute; accepted: a path relative to {str(base)!r}")
    root = Path(base).resolve()
    target = (root / rel).resolve()
    if target != root and not target.is_relative_to(root):
        raise InputError(f"path {str(relative)!r} leaves the folder {str(root)!r}; accepted: a path inside it")
    return target


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False,
                 fsync: bool = True) -> None:
    """Replace ``path`` by what ``write`` writes, atomically.

    Parameters
    ----------
    path : path
        The file to create or replace. A reader sees either the old file or the complete new one, never a part.
    write : callable
        Called once with an open file object (text, UTF-8; or binary with ``binary=True``).
    binary : bool
        Open the temporary file in binary mode.
    fsync : bool
        Flush the data to disk before the rename.

    Notes
    -----
    The temporary file is made by `tempfile.mkstemp` in the folder of ``path`` (``O_CREAT | O_EXCL``, random name),
    so no existing file or symlink is followed. It is removed if ``write`` raises.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
