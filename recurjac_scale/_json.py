"""Strict JSON for metadata and results: JSON has no infinity or NaN, so they are written as the strings
``"inf"``, ``"-inf"``, ``"nan"`` (read back by ``float()`` and numpy's float conversion).  One helper for every
result's ``to_dict()``, the store's attributes and the engine's checkpoint description."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

__all__ = ["json_float", "json_safe"]


def json_float(v) -> float | str | None:
    """A number as strict JSON: a float, or ``"inf"`` / ``"-inf"`` / ``"nan"``; ``None`` stays ``None``."""
    if v is None:
        return None
    f = float(v)
    if math.isfinite(f):
        return f
    return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")


def json_safe(v: Any) -> Any:
    """Metadata as strict JSON: numpy scalars and arrays to Python, paths to ``str``, non-finite floats as
    :func:`json_float`, containers recursively (tuples become lists); anything else by ``str``."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return json_safe(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return json_float(v)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return str(v)
