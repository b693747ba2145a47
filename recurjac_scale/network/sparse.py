"""Pruned (sparse) weight matrices: magnitude pruning, CSR storage in zarr, sparse x dense products.

A layer whose weight density (fraction of non-zero entries) is below :data:`SPARSE_DENSITY_THRESHOLD` (30%) can
be stored as CSR and multiplied as sparse x dense (``scipy.sparse``) in the Jacobian kernels: the cost of
``W @ X`` then scales with ``nnz(W)`` instead of ``n_out * n_in``.

CSR layout in a zarr v3 group (format ``recurjac-scale-csr``, version 1)
-------------------------------------------------------------------------
::

    GROUP/                 zarr v3 group; attributes: format, format_version, shape [n_rows, n_cols], nnz, dtype
      indptr               int64 array (n_rows + 1,), indptr[0] = 0, non-decreasing, indptr[-1] = nnz
      indices              int32 (int64 when n_cols >= 2**31) array (nnz,): column of each stored entry, strictly
                           increasing within a row
      data                 float32 / float64 array (nnz,): the values (explicit zeros are not stored)

``W[r, indices[indptr[r]:indptr[r+1]]] = data[indptr[r]:indptr[r+1]]``, every other entry is 0: the scipy /
Compressed Sparse Row convention, so ``scipy.sparse.csr_array((data, indices, indptr), shape)`` reads it back
without conversion.  Fill values are invalid on purpose (``-1`` for the index arrays, NaN for ``data``): a lost
chunk is detected by :func:`read_csr` instead of turning into zeros.  The round trip is bitwise exact (lossless
codecs, no dtype change).  :func:`read_csr_rows` reads a row panel ``W[r0:r1]`` without touching the rest, for
weights that stream through a worker in row panels.

Soundness of the products
-------------------------
``scipy.sparse`` sums the products of one output entry over the stored entries of a row (at most ``n_in`` terms),
in a different order than BLAS.  The rounding error of either is bounded by ``gamma(n_in) * (|A| |B|)`` (see
:mod:`recurjac_scale._fp`), so the outward widening that the dense kernels apply covers the sparse path
unchanged.  Skipping the zero entries of ``W`` is exact: their products are exactly zero (the weights are finite).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import InputError, NonFiniteError, ShapeMismatchError, StoreError

__all__ = [
    "SPARSE_DENSITY_THRESHOLD",
    "CSR_FORMAT_NAME",
    "CSR_FORMAT_VERSION",
    "density",
    "prune",
    "to_csr",
    "should_store_sparse",
    "write_csr",
    "read_csr",
    "read_csr_rows",
    "is_csr_group",
    "sparse_matmul",
    "matmul_sparse",
    "sign_split",
    "abs_sparse",
    "interval_matmul_sparse",
    "csr_nbytes",
    "break_even_density",
]

SPARSE_DENSITY_THRESHOLD = 0.30
"""Density below which a weight is worth storing as CSR (issue 5: "e.g. < 30%").  A CSR entry costs 12 bytes
(float64 + int32 index) against 8 dense, and a sparse x dense product runs at a fraction of the BLAS rate, so the
break-even is well below 50%."""

CSR_FORMAT_NAME = "recurjac-scale-csr"
CSR_FORMAT_VERSION = 1
_CHUNK_ELEMENTS = 2**20  # 1-D chunks of about 8 MiB (float64)


# -- density and pruning ------------------------------------------------------------------------------------------


def density(w) -> float:
    """Fraction of non-zero entries of a matrix (numpy array, scipy sparse array/matrix or dask array).

    Returns
    -------
    float
        ``count_nonzero(w) / w.size`` in [0, 1]; 0 for an empty matrix.  For a sparse matrix, stored explicit
        zeros are not counted.
    """
    if sp.issparse(w):
        size = int(np.prod(w.shape))
        return 0.0 if size == 0 else int(np.count_nonzero(w.data)) / size
    if hasattr(w, "dask"):
        import dask.array as da

        size = int(np.prod(w.shape))
        return 0.0 if size == 0 else float(da.count_nonzero(w).compute()) / size
    a = np.asarray(w)
    return 0.0 if a.size == 0 else int(np.count_nonzero(a)) / a.size


def prune(weight, fraction: float) -> np.ndarray:
    """Magnitude pruning: set the ``fraction`` of entries with the smallest ``|w|`` to zero.

    Parameters
    ----------
    weight : array_like, shape (n_out, n_in)
        A dense weight matrix (not modified).
    fraction : float
        In [0, 1]: ``round(fraction * size)`` entries are zeroed, the smallest in magnitude (ties broken by
        position, so exactly that many; entries that are already 0 count as the smallest).

    Returns
    -------
    ndarray, same shape and dtype as ``weight``
        The pruned copy.  The pruned network is a different network: bounds computed on it say nothing about
        the unpruned one.

    Raises
    ------
    InputError
        ``fraction`` outside [0, 1] or not a number.
    """
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise InputError(f"prune fraction {fraction!r} is not a number; accepted: a fraction in [0, 1]") from None
    if not (0.0 <= f <= 1.0):
        raise InputError(f"prune fraction {fraction!r} is invalid; accepted: a fraction in [0, 1]")
    w = np.array(weight, copy=True)
    k = int(round(f * w.size))
    if k == 0:
        return w
    flat = w.reshape(-1)
    if k >= flat.size:
        flat[:] = 0
        return w
    idx = np.argpartition(np.abs(flat), k - 1, kind="introselect")[:k]
    flat[idx] = 0
    return w


def to_csr(w, dtype=None) -> sp.csr_array:
    """A weight matrix as ``scipy.sparse.csr_array`` with sorted indices and no explicit zeros.

    Parameters
    ----------
    w : ndarray or scipy sparse, shape (n_out, n_in)
    dtype : optional
        Value dtype (default: keep the input's, float64 for integers).
    """
    if sp.issparse(w):
        a = sp.csr_array(w, copy=True)
    else:
        arr = np.asarray(w)
        if arr.ndim != 2:
            raise ShapeMismatchError(f"a weight matrix must be 2-D, got shape {arr.shape}")
        a = sp.csr_array(arr)
    if dtype is not None:
        a = a.astype(dtype)
    elif not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    a.eliminate_zeros()
    a.sort_indices()
    return a


def should_store_sparse(w, threshold: float = SPARSE_DENSITY_THRESHOLD) -> bool:
    """Whether ``density(w) < threshold`` (store and multiply this layer as CSR)."""
    return density(w) < threshold


# -- zarr storage -------------------------------------------------------------------------------------------------


def _index_dtype(n_cols: int) -> np.dtype:
    return np.dtype(np.int32) if n_cols < 2**31 else np.dtype(np.int64)


def write_csr(group, name: str, w, *, compressors: Any = "auto", chunk_elements: int = _CHUNK_ELEMENTS):
    """Write a matrix as a CSR sub-group ``group/name`` (layout in the module docstring).

    Parameters
    ----------
    group : zarr.Group
        An open, writable zarr v3 group.
    name : str
        Name of the new sub-group (must not exist).
    w : ndarray or scipy sparse, shape (n_rows, n_cols), float32 or float64
        Finite values.  Zeros are not stored.
    compressors : optional
        zarr v3 bytes-to-bytes codecs (``"auto"``: zarr's default, lossless).
    chunk_elements : int
        Chunk length of the 1-D arrays.

    Returns
    -------
    zarr.Group
        The new sub-group.

    Raises
    ------
    NonFiniteError
        ``w`` holds NaN or infinity.
    InputError
        A value dtype other than float32 / float64.
    """
    a = to_csr(w)
    if a.dtype not in (np.float32, np.float64):
        raise InputError(f"CSR values must be float32 or float64, got {a.dtype}")
    if not np.isfinite(a.data).all():
        raise NonFiniteError(f"matrix written to CSR group {name!r} holds NaN or infinite values")
    n_rows, n_cols = (int(s) for s in a.shape)
    ch = max(1, int(chunk_elements))
    g = group.create_group(name)
    arrays = (
        ("indptr", a.indptr.astype(np.int64), -1),
        ("indices", a.indices.astype(_index_dtype(n_cols)), -1),
        ("data", a.data, np.nan),
    )
    for aname, arr, fill in arrays:
        z = g.create_array(
            aname,
            shape=(int(arr.shape[0]),),
            dtype=arr.dtype,
            chunks=(max(1, min(ch, int(arr.shape[0]))),),
            fill_value=fill,
            compressors=compressors,
        )
        if arr.shape[0]:
            z[...] = arr
    g.attrs.update(
        {
            "format": CSR_FORMAT_NAME,
            "format_version": CSR_FORMAT_VERSION,
            "shape": [n_rows, n_cols],
            "nnz": int(a.nnz),
            "dtype": np.dtype(a.dtype).name,
        }
    )
    return g


def is_csr_group(node) -> bool:
    """Whether a zarr node is a group written by :func:`write_csr`."""
    import zarr

    return isinstance(node, zarr.Group) and node.attrs.get("format") == CSR_FORMAT_NAME


def _open_csr(group) -> tuple[Any, tuple[int, int], int]:
    import zarr

    if isinstance(group, (str, bytes)) or hasattr(group, "__fspath__"):
        try:
            group = zarr.open_group(str(group), mode="r", zarr_format=3, use_consolidated=False)
        except Exception as exc:
            raise StoreError(f"{str(group)!r} is not a readable zarr v3 group ({type(exc).__name__}: {exc})") from None
    if not is_csr_group(group):
        raise StoreError(f"zarr group {group.path!r} is not a {CSR_FORMAT_NAME} group")
    version = group.attrs.get("format_version")
    if not isinstance(version, int) or version > CSR_FORMAT_VERSION:
        raise StoreError(f"CSR group {group.path!r} has format_version {version!r}; this reader knows <= {CSR_FORMAT_VERSION}")
    try:
        n_rows, n_cols = (int(s) for s in group.attrs["shape"])
        nnz = int(group.attrs["nnz"])
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"CSR group {group.path!r} has no valid 'shape' / 'nnz' attributes") from None
    for aname, n in (("indptr", n_rows + 1), ("indices", nnz), ("data", nnz)):
        if aname not in group or tuple(group[aname].shape) != (n,):
            raise StoreError(f"CSR group {group.path!r}: array {aname!r} is missing or not of shape ({n},)")
    return group, (n_rows, n_cols), nnz


def _check_panel(path: str, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int) -> None:
    if indptr.size and (indptr[0] < 0 or (np.diff(indptr) < 0).any()):
        raise StoreError(f"CSR group {path!r}: indptr is negative or decreasing (corrupt or missing chunk)")
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise StoreError(f"CSR group {path!r}: column index out of [0, {n_cols}) (corrupt or missing chunk)")
    if not np.isfinite(data).all():
        raise StoreError(f"CSR group {path!r}: non-finite values (corrupt or missing chunk)")
    # strictly increasing columns within each row
    if indices.size > 1:
        step = np.diff(indices)
        row_start = np.zeros(indices.size, dtype=bool)
        starts = (indptr[1:-1] - indptr[0]).astype(np.int64)
        row_start[starts[(starts > 0) & (starts < indices.size)]] = True
        if ((step <= 0) & ~row_start[1:]).any():
            raise StoreError(f"CSR group {path!r}: column indices not strictly increasing within a row")


def read_csr(group) -> sp.csr_array:
    """Read a CSR group back (exact round trip of :func:`write_csr`).

    Parameters
    ----------
    group : zarr.Group or path
        The group written by :func:`write_csr` (or the path of a store whose root is such a group).

    Returns
    -------
    scipy.sparse.csr_array, shape from the ``shape`` attribute
        Values of the stored dtype, indices as stored.

    Raises
    ------
    StoreError
        Not a CSR group, newer format, inconsistent lengths, or arrays that fail validation (a lost chunk reads
        as -1 / NaN and is caught here).
    """
    g, (n_rows, n_cols), nnz = _open_csr(group)
    indptr = np.asarray(g["indptr"][...])
    indices = np.asarray(g["indices"][...])
    data = np.asarray(g["data"][...])
    if indptr[0] != 0 or indptr[-1] != nnz:
        raise StoreError(f"CSR group {g.path!r}: indptr must start at 0 and end at nnz = {nnz}")
    _check_panel(g.path, indptr, indices, data, n_cols)
    return sp.csr_array((data, indices, indptr), shape=(n_rows, n_cols))


def read_csr_rows(group, r0: int, r1: int) -> sp.csr_array:
    """Read the row panel ``W[r0:r1]`` of a CSR group, touching only its part of ``indices`` and ``data``.

    Returns
    -------
    scipy.sparse.csr_array, shape (r1 - r0, n_cols)
    """
    g, (n_rows, n_cols), nnz = _open_csr(group)
    r0, r1 = int(r0), int(r1)
    if not (0 <= r0 <= r1 <= n_rows):
        raise InputError(f"row panel [{r0}, {r1}) is outside [0, {n_rows}]")
    indptr = np.asarray(g["indptr"][r0:r1 + 1])
    lo, hi = int(indptr[0]), int(indptr[-1])
    if not (0 <= lo <= hi <= nnz):
        raise StoreError(f"CSR group {g.path!r}: indptr out of [0, nnz] (corrupt or missing chunk)")
    indices = np.asarray(g["indices"][lo:hi])
    data = np.asarray(g["data"][lo:hi])
    _check_panel(g.path, indptr, indices, data, n_cols)
    return sp.csr_array((data, indices, indptr - lo), shape=(r1 - r0, n_cols))


# -- products for the kernels ---------------------------------------------------------------------------------------


def _dense_2d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ShapeMismatchError(f"{name} must be 2-D, got shape {a.shape}")
    return a


def sparse_matmul(a: sp.sparray, b, rows=None, cols=None) -> np.ndarray:
    """``A[rows][:, cols] @ B`` for a sparse ``A`` and a dense ``B``, as a dense C-ordered array.

    Parameters
    ----------
    a : scipy sparse, shape (n, k)
        E.g. ``W(i)`` of a pruned layer.
    b : ndarray, shape (k', c)
        Dense right factor; ``k' = len(cols)`` when ``cols`` is given (the structural-sparsity set ``S`` of
        ALGORITHM.md: ``W(i)[:, S] @ V'[S, :]``), else ``k``.
    rows, cols : index array or boolean mask, optional
        Row / column selections of ``A``.

    Returns
    -------
    ndarray, shape (n or len(rows), c), dtype ``result_type(a, b)``
        Cost ``2 * nnz(A[rows][:, cols]) * c`` flops.
    """
    b = _dense_2d(b, "right factor")
    m = a
    if rows is not None:
        m = sp.csr_array(m)[rows]
    if cols is not None:
        m = sp.csc_array(m)[:, cols]
    if m.shape[1] != b.shape[0]:
        raise ShapeMismatchError(f"sparse {m.shape} @ dense {b.shape}: inner dimensions differ")
    out = m @ b
    return np.ascontiguousarray(out)


def matmul_sparse(a, b: sp.sparray) -> np.ndarray:
    """``A @ B`` for a dense ``A`` (m, k) and a sparse ``B`` (k, n), as a dense array (m, n).

    Used by the backward direction, where the bounds ``Y (m, n_l)`` multiply ``W(l) (n_l, n_{l-1})``: computed as
    ``(B.T @ A.T).T`` so that scipy's sparse x dense kernel is used (cost ``2 * nnz(B) * m``).
    """
    a = _dense_2d(a, "left factor")
    if a.shape[1] != b.shape[0]:
        raise ShapeMismatchError(f"dense {a.shape} @ sparse {b.shape}: inner dimensions differ")
    out = sp.csr_array(b).T @ a.T
    return np.ascontiguousarray(out.T)


def sign_split(w: sp.sparray) -> tuple[sp.csr_array, sp.csr_array]:
    """``(W⁺, W⁻) = (max(W, 0), min(W, 0))`` of a sparse matrix, both CSR with the same shape (no explicit
    zeros).  ``W⁺ + W⁻ = W`` exactly."""
    a = to_csr(w)
    pos = a.copy()
    pos.data = np.where(pos.data > 0, pos.data, 0).astype(a.dtype)
    neg = a.copy()
    neg.data = np.where(neg.data < 0, neg.data, 0).astype(a.dtype)
    pos.eliminate_zeros()
    neg.eliminate_zeros()
    return pos, neg


def abs_sparse(w: sp.sparray) -> sp.csr_array:
    """``|W|`` elementwise, CSR."""
    a = to_csr(w)
    a.data = np.abs(a.data)
    return a


def interval_matmul_sparse(a: sp.sparray, lo, hi, b) -> tuple[np.ndarray, np.ndarray]:
    """Enclosure of ``{A D(s) B : lo <= s <= hi}`` elementwise, for sparse ``A`` and dense ``B``.

    Midpoint-radius form (STACK.md): ``A D(mid) B ± |A| D(rad) |B|`` with ``mid = (lo + hi) / 2`` and
    ``rad = (hi - lo) / 2``; exact in real arithmetic when ``lo <= hi``.  Floating-point rounding is *not*
    accounted for here: the caller widens by ``gamma(n) * |A| D(max|lo|,|hi|) |B|`` as the dense kernels do.

    Parameters
    ----------
    a : scipy sparse, shape (n, k)
    lo, hi : ndarray, shape (k,)
    b : ndarray, shape (k, c)

    Returns
    -------
    (lower, upper) : ndarray, shape (n, c) each
    """
    b = _dense_2d(b, "right factor")
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.shape != (a.shape[1],) or hi.shape != lo.shape:
        raise ShapeMismatchError(f"interval vectors of shape {lo.shape}/{hi.shape}, need ({a.shape[1]},)")
    if (lo > hi).any():
        raise InputError("interval with lo > hi")
    mid = 0.5 * (lo + hi)
    rad = 0.5 * (hi - lo)
    centre = sparse_matmul(a, mid[:, None] * b)
    radius = sparse_matmul(abs_sparse(a), rad[:, None] * np.abs(b))
    return centre - radius, centre + radius


def csr_nbytes(w: sp.sparray) -> int:
    """Bytes of the three CSR arrays (as stored by :func:`write_csr`, before compression)."""
    a = sp.csr_array(w)
    return int(a.data.nbytes + a.nnz * _index_dtype(a.shape[1]).itemsize + (a.shape[0] + 1) * 8)


def break_even_density(sparse_rate: float, dense_rate: float) -> float:
    """Density below which a sparse x dense product beats dense BLAS, given the measured rates (flop/s) of
    each on useful flops: ``sparse_rate / dense_rate``, clipped to [0, 1]."""
    if not (sparse_rate > 0 and dense_rate > 0) or math.isinf(sparse_rate) or math.isinf(dense_rate):
        raise InputError("rates must be positive and finite")
    return min(1.0, sparse_rate / dense_rate)
