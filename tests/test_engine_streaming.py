"""Streamed weights (recurjac_scale.engine.streaming): tasks read the chain matrices from the model store one row
panel at a time, only the live rows a recursion level uses, and still give the in-memory result bitwise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.engine import plan_jacobian
from recurjac_scale.engine import streaming
from recurjac_scale.engine.streaming import StoreMatrix
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.network.store import save_network
from recurjac_scale.testing import random_network


class _Spy:
    """Wraps a zarr array and records the shape of every read."""

    def __init__(self, z):
        self.z = z
        self.reads = []

    def __getitem__(self, idx):
        a = np.asarray(self.z[idx])
        self.reads.append(a.shape)
        return a


@pytest.fixture
def store(tmp_path, rng):
    net = random_network([9, 14, 12, 11, 4], "relu", rng)
    save_network(net, tmp_path / "m.zarr", chunk_edge=5)
    return net, tmp_path / "m.zarr"


@pytest.mark.parametrize("transpose", [False, True])
def test_store_matrix_reads_live_rows_panel_by_panel(store, rng, transpose):
    net, path = store
    W = np.asarray(net.weights[1], dtype=np.float64)  # (12, 14)
    ref = W.T if transpose else W
    live = rng.random(ref.shape[0]) < 0.5
    live[0] = True
    live[-1] = False
    live[2:5] = False  # a whole panel of dead rows (panel = 2 rows below) is never read
    M = StoreMatrix(str(path), 1, transpose, ref.shape, live, panel_bytes=2 * 8 * ref.shape[1])
    assert M.panel_rows() == 2
    spy = _Spy(M._array())
    M._z = spy
    a = np.asarray(M)
    assert a.shape == ref.shape and a.dtype == np.float64
    np.testing.assert_array_equal(a[live], ref[live])
    assert not a[~live].any()
    # every read is at most one panel of the matrix's rows (a column panel of the stored weight when transposed)
    assert spy.reads and all((s[1] if transpose else s[0]) <= 2 for s in spy.reads)
    n_read = sum(s[1] if transpose else s[0] for s in spy.reads)
    assert n_read < ref.shape[0]  # dead panels skipped
    # column panels (a step's operand) still read every row exactly
    M._z = spy.z
    cols = np.array([0, 3, 4])
    np.testing.assert_array_equal(M[:, cols], ref[:, cols])
    # without live rows everything is read
    full = StoreMatrix(str(path), 1, transpose, ref.shape, panel_bytes=1)
    np.testing.assert_array_equal(np.asarray(full), ref)


@pytest.mark.parametrize("method", sorted(JACOBIAN_METHODS))
def test_streamed_with_tiny_panels_equals_in_memory(store, rng, monkeypatch, method):
    """One row per panel: many panels per level, only live rows filled; same bits as the in-memory path."""
    net, path = store
    monkeypatch.setattr(streaming, "STREAM_PANEL_BYTES", 1)
    x0 = rng.normal(size=9)
    ref = jacobian_bounds(net, x0, 0.05, math.inf, method=method, layer_bounds="ibp", outputs=(0, 2))
    plan = plan_jacobian(path, x0, 0.05, math.inf, method, layer_bounds="ibp", row_block=1, col_block=3,
                         stream_weights=True, outputs=(0, 2))
    assert plan.stream_weights
    res = plan.compute(scheduler="threads", durable=False)
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    chain = plan.context.worker_spec().chain().chain
    sm = [m for m in chain.mats if isinstance(m, StoreMatrix)]
    assert sm and all(m.live_rows is not None and m.panel_rows() == 1 for m in sm)
    # the masks leave rows out (dead neurons exist), so the equality above exercises the live-row reading
    assert any(not m.live_rows.all() for m in sm)
    for m, du in zip(chain.mats, chain.du):
        if isinstance(m, StoreMatrix):
            np.testing.assert_array_equal(m.live_rows, np.asarray(du) > 0)


def test_plan_counts_the_streamed_weights(tmp_path, rng):
    """A streamed task's planned peak covers the live rows of a level it reads plus the live block it cuts out
    (counted here from the chain, independently of the plan's formula)."""
    net = random_network([10, 40, 40, 40, 3], "relu", rng)
    save_network(net, tmp_path / "m.zarr")
    x0 = rng.normal(size=10)
    plan = plan_jacobian(tmp_path / "m.zarr", x0, 0.05, math.inf, "recurjac-b", layer_bounds="ibp", row_block=1,
                         col_block=8, stream_weights=True)
    chain = plan.context.worker_spec().chain().chain
    T = chain.n_steps
    t = T
    need = 0
    for s in range(t, 1, -1):
        M = chain.mats[s - 2]
        up, lo = np.asarray(chain.du[s - 2]) > 0, np.asarray(chain.du[s - 1]) > 0
        need = max(need, 8 * (int(up.sum()) * M.shape[1] + int(up.sum()) * int(lo.sum())))
    assert need > 0
    step = [s for s in plan.steps if s.step == t][0]
    assert step.task_peak_bytes >= need
    assert plan.peak_worker_bytes >= need


@pytest.mark.parametrize("transpose", [False, True])
def test_norm_bound_of_a_streamed_matrix_reads_panels_and_bounds_the_dense_one(store, transpose):
    """The underflow allowance needs row/column abs-sum bounds of every chain matrix: a streamed matrix gives them
    one row panel at a time (never the whole matrix), at least the exact value and within rounding of it."""
    from recurjac_scale.jacobian.chain import _abs_sum_bound

    net, path = store
    W = np.asarray(net.weights[1], dtype=np.float64)
    ref = W.T if transpose else W
    M = StoreMatrix(str(path), 1, transpose, ref.shape, None, panel_bytes=3 * 8 * ref.shape[1])
    spy = _Spy(M._array())
    M._z = spy
    b = _abs_sum_bound(M)
    exact = max(np.abs(ref).sum(axis=1).max(), np.abs(ref).sum(axis=0).max())
    assert exact <= b <= exact * (1 + 1e-12)
    assert b == _abs_sum_bound(ref) or abs(b - _abs_sum_bound(ref)) <= 1e-12 * exact
    assert spy.reads and all((s[1] if transpose else s[0]) <= 3 for s in spy.reads)
