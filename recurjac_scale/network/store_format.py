"""Name and versions of the model store format (the layout is described in :mod:`recurjac_scale.network.store`).

Shared by the writer (:mod:`recurjac_scale.network.store`) and the reader (:mod:`recurjac_scale.network.store_read`).
"""

from __future__ import annotations

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SPARSE_FORMAT_VERSION"]

FORMAT_NAME = "recurjac-scale-model"
FORMAT_VERSION = 1
"""The store format version written by this code; stores with a larger version are refused."""

SPARSE_FORMAT_VERSION = 2
"""The version written when at least one layer is stored as CSR (module docstring); a version-2 store must declare
its ``sparse_layers``.  Any other version above :data:`FORMAT_VERSION` is refused."""

_DTYPES = ("float32", "float64")
"""The dtypes a store may hold (all its arrays share one)."""
