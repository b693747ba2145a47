"""Reading a zarr result store written by :func:`recurjac_scale.engine.run.run_plan` (``recurjac-scale run``),
never trusting it blindly.

The store's attributes hold ``format`` (``recurjac-scale-jacobian-bounds``), ``format_version``, ``complete``
(true only once every block was computed) and ``sha256``: the SHA-256 of the C-order float64 bytes of ``lower``
and ``upper``.  :func:`read_result_store` checks all of them: a store edited by hand or damaged on disk raises
:class:`~recurjac_scale.errors.IntegrityError` (rerun the job with ``--overwrite`` to recompute it), a partial one
:class:`~recurjac_scale.errors.IncompleteRunError`.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from ..errors import IncompleteRunError, IntegrityError, StoreError

__all__ = ["RESULT_FORMAT", "RESULT_FORMAT_VERSION", "array_sha256", "read_result_store"]

RESULT_FORMAT = "recurjac-scale-jacobian-bounds"
RESULT_FORMAT_VERSION = 1


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 (hex) of an array's C-order float64 bytes, with its shape."""
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def read_result_store(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(lower, upper, attributes)`` of a result store, after checking its format, completeness and checksums.

    Returns
    -------
    lower, upper : ndarray, shape (m, n_0), float64
        ``lower <= d(C f)/dx (x) <= upper`` over the job's region (as certified when the store was written).
    attributes : dict

    Raises
    ------
    StoreError
        Not a result store, or a newer format version.
    IncompleteRunError
        The store is not marked complete.
    IntegrityError
        ``lower`` or ``upper`` does not match its SHA-256 checksum, or the store holds none.
    """
    import zarr

    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs)
    except Exception as exc:  # noqa: BLE001 - any unreadable store is reported the same way
        raise StoreError(f"{str(path)!r}: not a readable result store ({type(exc).__name__}: {exc})") from None
    if attrs.get("format") != RESULT_FORMAT:
        raise StoreError(f"{str(path)!r}: not a recurjac-scale result store (format {attrs.get('format')!r})")
    if int(attrs.get("format_version", 0)) > RESULT_FORMAT_VERSION:
        raise StoreError(
            f"{str(path)!r}: result format version {attrs.get('format_version')} is newer than the version "
            f"{RESULT_FORMAT_VERSION} this recurjac-scale reads; upgrade recurjac-scale"
        )
    if attrs.get("complete") is not True:
        raise IncompleteRunError(f"{str(path)!r}: the result store is not marked complete; rerun the job")
    sums = attrs.get("sha256")
    if not isinstance(sums, dict):
        raise IntegrityError(f"{str(path)!r}: the result store holds no checksums; recompute it with --overwrite")
    out = []
    for k in ("lower", "upper"):
        try:
            a = np.asarray(g[k][...], dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            raise IntegrityError(f"{str(path)!r}: array {k!r} cannot be read ({type(exc).__name__}: {exc})") from None
        if array_sha256(a) != sums.get(k):
            raise IntegrityError(
                f"{str(path)!r}: array {k!r} does not match its SHA-256 checksum (edited or damaged); recompute "
                "it with --overwrite"
            )
        out.append(a)
    return out[0], out[1], attrs
