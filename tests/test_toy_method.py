"""A new Jacobian method is one module that registers itself (tests/toy_interval_method.py): it runs through the
in-memory driver and the engine (threads, and a real 2-worker LocalCluster on loopback) by name, with no change to
either, and its bounds contain the true Jacobian."""

from __future__ import annotations

import numpy as np
import pytest

from recurjac_scale.engine import plan_jacobian
from recurjac_scale.engine.schedulers import WORKER_ENV
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds, register_jacobian_method
from recurjac_scale.layer_bounds import Region
from recurjac_scale.testing import random_network, sample_region

EPS = 0.05


@pytest.fixture(scope="module")
def toy():
    """The toy module, imported here (not at collection: other test modules parametrise over the registry), and
    taken out of the registry again after this module's tests."""
    import toy_interval_method as toy

    register_jacobian_method(toy.TOY)  # a no-op on first import, which registered it
    try:
        yield toy
    finally:
        JACOBIAN_METHODS.pop(toy.NAME, None)


@pytest.fixture
def case():
    rng = np.random.default_rng(7)
    net = random_network([6, 9, 8, 7, 3], "tanh", rng)
    return net, rng.uniform(-0.5, 0.5, 6)


def _exact_jacobians(net, x0, rng, n=200):
    xs = sample_region(Region.of(net, x0, EPS, np.inf), n, rng)
    return np.stack([net.jacobian(x) for x in xs])


def test_toy_method_is_registered_and_sound(toy, case):
    net, x0 = case
    assert JACOBIAN_METHODS[toy.NAME] is toy.TOY
    jb = jacobian_bounds(net, x0, EPS, np.inf, method=toy.NAME)
    assert jb.method == toy.NAME and jb.lower.shape == (3, 6)
    J = _exact_jacobians(net, x0, np.random.default_rng(1))
    assert (jb.lower <= J).all() and (J <= jb.upper).all()
    # a plain interval product: never tighter than Fast-Lip's (same chain, Fast-Lip also skips dead neurons)
    fl = jacobian_bounds(net, x0, EPS, np.inf, method="fastlip")
    assert (jb.upper - jb.lower >= fl.upper - fl.lower - 1e-12).all()


def test_toy_method_runs_in_the_engine_with_threads(toy, case):
    net, x0 = case
    ref = jacobian_bounds(net, x0, EPS, np.inf, method=toy.NAME)
    plan = plan_jacobian(net, x0, EPS, np.inf, method=toy.NAME, row_block=2, col_block=3)
    assert plan.method == toy.NAME and plan.flops > 0
    res = plan.compute(scheduler="threads", threads_per_worker=2)
    assert np.array_equal(res.lower, ref.lower) and np.array_equal(res.upper, ref.upper)


@pytest.mark.cluster
def test_toy_method_runs_on_a_local_cluster(toy, case, tmp_path):
    distributed = pytest.importorskip("distributed")
    from recurjac_scale.network.store import save_network

    net, x0 = case
    store = save_network(net, tmp_path / "net.zarr", chunk_edge=4)
    ref = jacobian_bounds(net, x0, EPS, np.inf, method=toy.NAME)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        env=dict(WORKER_ENV),
    ) as cluster, distributed.Client(cluster) as client:
        for stream in (False, True):
            plan = plan_jacobian(store, x0, EPS, np.inf, method=toy.NAME, row_block=2, col_block=3,
                                 stream_weights=stream)
            res = plan.compute(client=client)
            assert np.array_equal(res.lower, ref.lower) and np.array_equal(res.upper, ref.upper)
        assert len(client.scheduler_info()["workers"]) == 2
