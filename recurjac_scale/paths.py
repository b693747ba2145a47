"""Paths named inside user-given files (JSON job lists, VNN-LIB specifications) must stay inside the folder they
are resolved against: ``../../etc/passwd``, an absolute path or a symlink pointing out is refused."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

__all__ = ["resolve_inside"]


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
