"""Pruned-sparse weights (recurjac_scale.network.sparse): pruning, density, exact CSR round trip through zarr,
corruption detection, sparse x dense products against dense numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from recurjac_scale.errors import InputError, NonFiniteError, StoreError
from recurjac_scale.network import sparse as S


def _pruned(rng, shape=(37, 53), fraction=0.9, dtype=np.float64):
    w = rng.standard_normal(shape).astype(dtype)
    return S.prune(w, fraction)


def test_prune_zeroes_exactly_the_smallest_magnitudes(rng):
    w = rng.standard_normal((40, 25))
    p = S.prune(w, 0.7)
    k = round(0.7 * w.size)
    assert np.count_nonzero(p == 0) == k
    kept = p != 0
    # every kept entry is at least as large in magnitude as every pruned one, and kept entries are unchanged
    assert np.abs(w[kept]).min() >= np.abs(w[~kept]).max()
    np.testing.assert_array_equal(p[kept], w[kept])
    assert S.density(p) == pytest.approx(1 - k / w.size)
    assert np.count_nonzero(w) == w.size  # input untouched
    np.testing.assert_array_equal(S.prune(w, 0.0), w)
    assert not S.prune(w, 1.0).any()
    with pytest.raises(InputError):
        S.prune(w, 1.5)
    with pytest.raises(InputError):
        S.prune(w, "much")


def test_density_of_all_kinds(rng):
    import dask.array as da

    w = _pruned(rng, (30, 40), 0.75)
    d = np.count_nonzero(w) / w.size
    assert d == pytest.approx(0.25)
    assert S.density(w) == d
    assert S.density(sp.csr_array(w)) == d
    assert S.density(da.from_array(w, chunks=(7, 9))) == d
    assert S.should_store_sparse(w) and not S.should_store_sparse(rng.standard_normal((4, 4)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_csr_zarr_round_trip_is_exact(rng, tmp_path, dtype):
    w = _pruned(rng, (61, 47), 0.85, dtype)
    w[5, :] = 0  # an empty row
    w[:, 3] = 0  # an empty column
    root = zarr.open_group(str(tmp_path / "m.zarr"), mode="w", zarr_format=3)
    S.write_csr(root, "weight", w, chunk_elements=50)  # several chunks per array
    g = zarr.open_group(str(tmp_path / "m.zarr"), mode="r", zarr_format=3)
    assert S.is_csr_group(g["weight"])
    assert g["weight"].attrs["shape"] == [61, 47]
    back = S.read_csr(g["weight"])
    assert isinstance(back, sp.csr_array)
    assert back.dtype == dtype and back.shape == w.shape
    np.testing.assert_array_equal(back.toarray(), w)  # bitwise: float equality of every entry
    assert back.nnz == np.count_nonzero(w)
    # a row panel reads the same rows
    panel = S.read_csr_rows(g["weight"], 3, 20)
    np.testing.assert_array_equal(panel.toarray(), w[3:20])
    np.testing.assert_array_equal(S.read_csr_rows(g["weight"], 7, 7).toarray(), w[7:7])
    with pytest.raises(InputError):
        S.read_csr_rows(g["weight"], 10, 62)


def test_csr_write_refuses_non_finite(rng, tmp_path):
    w = _pruned(rng)
    w[np.nonzero(w)[0][0], np.nonzero(w)[1][0]] = np.nan
    root = zarr.open_group(str(tmp_path / "m.zarr"), mode="w", zarr_format=3)
    with pytest.raises(NonFiniteError):
        S.write_csr(root, "weight", w)


def test_lost_chunk_is_detected(rng, tmp_path):
    w = _pruned(rng, (50, 50), 0.6)
    path = tmp_path / "m.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    S.write_csr(root, "weight", w, chunk_elements=64)
    chunk_files = sorted((path / "weight" / "data" / "c").iterdir())
    assert len(chunk_files) > 2
    chunk_files[1].unlink()  # a lost chunk reads back as the fill value (NaN), never as zeros
    with pytest.raises(StoreError, match="corrupt or missing"):
        S.read_csr(zarr.open_group(str(path), mode="r")["weight"])
    with pytest.raises(StoreError, match="not a"):
        S.read_csr(zarr.open_group(str(path), mode="r"))


def test_unsorted_or_out_of_range_indices_are_rejected(rng, tmp_path):
    w = _pruned(rng, (20, 30), 0.7)
    path = tmp_path / "m.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    S.write_csr(root, "weight", w)
    ind = root["weight/indices"]
    good = ind[...]
    r = int(np.argmax(np.diff(sp.csr_array(w).indptr) >= 2))  # a row with at least two entries
    start = int(sp.csr_array(w).indptr[r])
    bad = good.copy()
    bad[start], bad[start + 1] = good[start + 1], good[start]
    ind[...] = bad
    with pytest.raises(StoreError, match="increasing"):
        S.read_csr(root["weight"])
    bad = good.copy()
    bad[start + 1] = good[start]  # a duplicate column
    ind[...] = bad
    with pytest.raises(StoreError, match="increasing"):
        S.read_csr(root["weight"])
    bad = good.copy()
    bad[0] = 30
    ind[...] = bad
    with pytest.raises(StoreError, match="out of"):
        S.read_csr(root["weight"])


def test_sparse_products_match_dense(rng):
    w = _pruned(rng, (45, 60), 0.9)
    a = S.to_csr(w)
    x = rng.standard_normal((60, 7))
    np.testing.assert_allclose(S.sparse_matmul(a, x), w @ x, rtol=1e-13, atol=1e-13)
    cols = rng.random(60) < 0.5
    np.testing.assert_allclose(S.sparse_matmul(a, x[cols], cols=cols), w[:, cols] @ x[cols], rtol=1e-13, atol=1e-13)
    rows = np.array([3, 0, 44, 10])
    np.testing.assert_allclose(S.sparse_matmul(a, x, rows=rows), w[rows] @ x, rtol=1e-13, atol=1e-13)
    y = rng.standard_normal((5, 45))
    np.testing.assert_allclose(S.matmul_sparse(y, a), y @ w, rtol=1e-13, atol=1e-13)
    pos, neg = S.sign_split(a)
    np.testing.assert_array_equal(pos.toarray(), np.maximum(w, 0))
    np.testing.assert_array_equal(neg.toarray(), np.minimum(w, 0))
    np.testing.assert_array_equal(S.abs_sparse(a).toarray(), np.abs(w))
    # the transpose (forward direction) needs no conversion by the caller
    np.testing.assert_allclose(S.sparse_matmul(a.T, y.T), w.T @ y.T, rtol=1e-13, atol=1e-13)


def test_interval_product_encloses_every_diagonal(rng):
    w = _pruned(rng, (20, 30), 0.8)
    a = S.to_csr(w)
    b = rng.standard_normal((30, 6))
    lo = rng.uniform(0, 1, 30)
    hi = lo + rng.uniform(0, 1, 30)
    hi[:5] = lo[:5]  # exact derivatives
    low, up = S.interval_matmul_sparse(a, lo, hi, b)
    # extreme diagonal per entry: the elementwise optimum picks lo or hi by the sign of w * b (attained)
    terms_lo = w[:, :, None] * b[None, :, :]
    best_up = np.where(terms_lo > 0, terms_lo * hi[None, :, None], terms_lo * lo[None, :, None]).sum(1)
    best_lo = np.where(terms_lo > 0, terms_lo * lo[None, :, None], terms_lo * hi[None, :, None]).sum(1)
    np.testing.assert_allclose(up, best_up, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(low, best_lo, rtol=1e-12, atol=1e-12)
    for _ in range(20):
        s = rng.uniform(lo, hi)
        v = w @ (s[:, None] * b)
        assert (v >= low - 1e-12).all() and (v <= up + 1e-12).all()
    with pytest.raises(InputError):
        S.interval_matmul_sparse(a, hi, lo - 1, b)
