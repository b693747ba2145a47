"""Streamed weights (recurjac_scale.engine.streaming): tasks read the chain matrices from the model store one tile
(inside one zarr chunk) at a time, only the compacted live block a recursion level uses, and still give the
in-memory result bitwise; the plan's memory model covers what a streamed task really allocates and counts the
worker baseline; a real out-of-core run on worker processes limited below the network's size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.engine import plan_jacobian
from recurjac_scale.engine import plan as plan_mod
from recurjac_scale.network import store_matrix
from recurjac_scale.engine.streaming import StoreMatrix
from recurjac_scale.errors import InputError
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.network.store import save_network
from recurjac_scale.testing import assert_tasks_within_plan_memory, random_network


class _Spy:
    """Wraps a zarr array and records the shape of every read."""

    def __init__(self, z):
        self.z = z
        self.chunks = z.chunks
        self.reads = []

    def __getitem__(self, idx):
        a = np.asarray(self.z[idx])
        self.reads.append(a.shape)
        self.where = getattr(self, "where", [])
        self.where.append(idx)
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


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("panel_bytes", [1, None])
def test_live_block_is_the_compacted_block_read_tile_by_tile(store, rng, transpose, panel_bytes):
    """``live_block(rows, cols)`` is bitwise ``M[np.ix_(rows, cols)]`` (sorted or not, any dtype), read in tiles that
    each lie inside one zarr chunk (5 x 5 here; default panel: one chunk column); tiles without a selected row or
    column are not read."""
    net, path = store
    W = np.asarray(net.weights[1], dtype=np.float64)  # (12, 14), chunks 5 x 5
    ref = W.T if transpose else W
    M = StoreMatrix(str(path), 1, transpose, ref.shape, panel_bytes=panel_bytes)
    spy = _Spy(M._array())
    M._z = spy
    rows = np.flatnonzero(rng.random(ref.shape[0]) < 0.6)
    rows = rows[(rows < 5) | (rows >= 10)]  # no row of the second tile row is selected
    cols = np.flatnonzero(rng.random(ref.shape[1]) < 0.6)
    B = M.live_block(rows, cols)
    assert B.flags.c_contiguous and B.dtype == np.float64
    np.testing.assert_array_equal(B, ref[np.ix_(rows, cols)])
    for idx in spy.where:  # every read inside one chunk column of the stored weight (one chunk with tiny panels)
        mrows, mcols = (idx[1], idx[0]) if transpose else (idx[0], idx[1])
        assert mcols.start // 5 == (mcols.stop - 1) // 5
        if panel_bytes == 1:  # one row of the matrix per tile
            assert mrows.stop - mrows.start == 1
    if panel_bytes == 1:
        stored_rows = [idx[1] if transpose else idx[0] for idx in spy.where]
        assert not any(5 <= sl.start < 10 for sl in stored_rows)
    # unsorted and repeated indices, another dtype: still the same numbers
    r2, c2 = rows[::-1].copy(), np.concatenate([cols, cols[:1]])[::-1].copy()
    np.testing.assert_array_equal(M.live_block(r2, c2), ref[np.ix_(r2, c2)])
    np.testing.assert_array_equal(M.live_block(rows, cols, np.float32), ref.astype(np.float32)[np.ix_(rows, cols)])
    # __getitem__ (a step's column panel) goes through the same reader
    np.testing.assert_array_equal(M[:, slice(2, 9)], ref[:, 2:9])
    np.testing.assert_array_equal(M[np.array([0, -1]), :], ref[[0, -1]])
    assert M.live_block([], cols).shape == (0, cols.size)
    with pytest.raises(IndexError):
        M.live_block([ref.shape[0]], cols)


@pytest.mark.parametrize("method", sorted(n for n, m in JACOBIAN_METHODS.items() if m.run is None))
def test_streamed_with_tiny_panels_equals_in_memory(store, rng, monkeypatch, method):
    """One row per panel: many panels per level, only live rows filled; same bits as the in-memory path."""
    net, path = store
    monkeypatch.setattr(store_matrix, "STREAM_PANEL_BYTES", 1)
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


@pytest.fixture
def counted_live_blocks(monkeypatch):
    calls = []
    orig = StoreMatrix.live_block

    def spy(self, rows, cols, dtype=None):
        calls.append((self.k, len(rows), len(cols)))
        return orig(self, rows, cols, dtype)

    monkeypatch.setattr(StoreMatrix, "live_block", spy)
    return calls


@pytest.mark.parametrize("method", ["recurjac-b", "recurjac-f0"])
@pytest.mark.parametrize("share", [False, True])
def test_streamed_uneven_blocks_equal_in_memory(tmp_path, rng, monkeypatch, counted_live_blocks, method, share):
    """Uneven row and column blocks, one-row tiles, both recursion variants (dense per row, sharing across rows):
    bitwise the in-memory result, and the levels read their blocks through ``live_block``."""
    net = random_network([11, 17, 13, 12, 5], "relu", rng)
    save_network(net, tmp_path / "m.zarr", chunk_edge=4)
    monkeypatch.setattr(store_matrix, "STREAM_PANEL_BYTES", 1)
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", math.inf if share else 0.0)
    x0 = rng.normal(size=11)
    ref = jacobian_bounds(net, x0, 0.04, math.inf, method=method, layer_bounds="ibp")
    plan = plan_jacobian(tmp_path / "m.zarr", x0, 0.04, math.inf, method, layer_bounds="ibp", row_block=3,
                         col_block=5, stream_weights=True)
    assert plan.stream_weights
    res = plan.compute(scheduler="threads", durable=False)
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    assert counted_live_blocks  # levels read compacted blocks from the store
    shares = plan.context.shape.shares  # the plan's memory model knows the variant (step 1 has no levels)
    assert len(shares) >= 3 and shares[1:] == (share,) * (len(shares) - 1)


@pytest.mark.parametrize("method", ["recurjac-b", "recurjac-f0"])
@pytest.mark.parametrize("share", [False, True])
def test_plan_bounds_what_a_streamed_task_allocates(tmp_path, rng, monkeypatch, method, share):
    """Every streamed step task allocates (tracemalloc: numpy and zarr buffers, all threads) at most the plan's
    task peak minus the priors it is given; the live blocks dominate here."""
    net = random_network([30, 90, 80, 70, 4], "relu", rng)
    save_network(net, tmp_path / "m.zarr", chunk_edge=32)
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", math.inf if share else 0.0)
    x0 = rng.normal(size=30)
    plan = plan_jacobian(tmp_path / "m.zarr", x0, 0.03, math.inf, method, layer_bounds="ibp", row_block=4,
                         col_block=24, stream_weights=True)
    assert any(isinstance(m, StoreMatrix) for m in plan.context.worker_spec().chain().chain.mats)
    assert_tasks_within_plan_memory(plan, 4, 24)


def test_plan_counts_the_live_blocks_a_streamed_task_reads(tmp_path, rng):
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


def test_plan_counts_the_worker_baseline_and_refuses_with_what_would_fit(tmp_path, rng):
    net = random_network([10, 40, 40, 40, 3], "relu", rng)
    save_network(net, tmp_path / "m.zarr")
    x0 = rng.normal(size=10)
    kw = dict(layer_bounds="ibp", stream_weights=True, threads_per_worker=2)
    plan = plan_jacobian(tmp_path / "m.zarr", x0, 0.05, math.inf, "recurjac-b", **kw)
    base = plan_mod.WORKER_BASELINE_BYTES
    assert plan.worker_baseline_bytes == base and plan.baseline_source == "constant"
    assert plan.peak_worker_bytes == base + 2 * max(s.task_peak_bytes for s in plan.steps)
    d = plan.to_dict()
    assert d["worker_baseline_bytes"] == base
    text = plan.describe()
    assert "baseline 256.0 MiB" in text and "whole network in the client's memory" in text
    # a budget below the baseline plus the smallest task is refused, naming the budget and what would fit
    with pytest.raises(InputError, match=r"memory budget 256\.0 MiB per worker is too small") as ei:
        plan_jacobian(tmp_path / "m.zarr", x0, 0.05, math.inf, "recurjac-b", memory_budget=base + 4096, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and "baseline 256.0 MiB" in msg and "--threads-per-worker" in msg
    need = msg.split("give --memory-budget >= ")[1].split(" or ")[0]
    ok = plan_jacobian(tmp_path / "m.zarr", x0, 0.05, math.inf, "recurjac-b", memory_budget=need, **kw)
    assert ok.peak_worker_bytes <= plan_mod.parse_bytes(need)




@pytest.mark.parametrize("transpose", [False, True])
def test_norm_bound_of_a_streamed_matrix_reads_panels_and_bounds_the_dense_one(store, transpose):
    """The underflow allowance needs row/column abs-sum bounds of every chain matrix: a streamed matrix gives them
    one row panel at a time (never the whole matrix), at least the exact value and within rounding of it."""
    from recurjac_scale.jacobian.rounding import _abs_sum_bound

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



@pytest.mark.cluster
def test_out_of_core_on_workers_limited_below_the_weights(tmp_path, rng):
    """A real out-of-core run: 2 worker processes whose memory_limit is below the network's weight bytes complete
    RecurJac-B through the streaming path, bitwise equal to the in-memory result, no worker restarted; the plan
    takes its budget and baseline from the cluster."""
    distributed = pytest.importorskip("distributed")
    from recurjac_scale import InputSpec, Network
    from recurjac_scale.engine.schedulers import WORKER_ENV

    n, H = 5120, 3  # hidden layers of n neurons: 2 n x n weights, 400 MiB float64
    ws = [rng.standard_normal((n, 16)) * np.sqrt(2 / 16)]
    ws += [rng.standard_normal((n, n)) * np.sqrt(2 / n) for _ in range(H - 1)]
    ws += [rng.standard_normal((2, n)) * np.sqrt(2 / n)]
    # 15/16 of every hidden layer is dead (bias far below any pre-activation), in contiguous rows: the live blocks
    # are small and most tiles are never read (fast enough for CI), and yet no worker may hold the network
    bs = [np.where(np.arange(w.shape[0]) < n // 16, 0.0, -1e4) for w in ws[:-1]] + [np.zeros(2)]
    net = Network(ws, bs, ["relu"] * H, input_spec=InputSpec((16,), domain_lower=0.0, domain_upper=1.0))
    save_network(net, tmp_path / "big.zarr", chunk_edge=320)
    weight_bytes = sum(w.nbytes for w in ws)
    limit = 390 * 2**20
    assert limit < weight_bytes
    x0 = rng.uniform(0.2, 0.8, size=16)
    ref = jacobian_bounds(net, x0, 0.01, math.inf, method="recurjac-b", layer_bounds="ibp", outputs=0)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address="127.0.0.1:0", memory_limit=limit, env=dict(WORKER_ENV))
    client = distributed.Client(cluster)
    try:
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        plan = plan_jacobian(tmp_path / "big.zarr", x0, 0.01, math.inf, "recurjac-b", layer_bounds="ibp",
                             outputs=0, client=client)
        assert plan.stream_weights  # the held weights do not fit the workers' budget
        assert plan.memory_budget == int(limit * 0.95)
        assert plan.peak_worker_bytes <= plan.memory_budget
        res = plan.compute(client=client, durable=False)
        np.testing.assert_array_equal(res.lower, ref.lower)
        np.testing.assert_array_equal(res.upper, ref.upper)
        assert set(client.run(lambda: __import__("os").getpid()).values()) == pids  # no worker was restarted
    finally:
        client.close()
        cluster.close()
