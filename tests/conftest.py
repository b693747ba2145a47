"""Shared fixtures: a seeded rng, the shared data folder, random networks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

try:  # hypothesis profiles (tests/test_properties.py): HYPOTHESIS_PROFILE=ci|dev|nightly
    from hypothesis import HealthCheck, settings

    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    # ci: derandomised and fast (the default when the CI variable is set); dev: random, a few more examples;
    # nightly: 50x ci's examples, excluded from CI, for the soundness sweep (benchmarks/RESULTS.md)
    settings.register_profile("ci", max_examples=12, derandomize=True, database=None, **_common)
    settings.register_profile("dev", max_examples=25, **_common)
    settings.register_profile("nightly", max_examples=600, **_common)
    # Derandomised "ci" unless asked otherwise: the README's test command must give the same result on every run.
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


def _find_shared() -> Path | None:
    env = os.environ.get("RECURJAC_SHARED")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" for p in here.parents]
    for c in candidates:
        if (c / "golden").is_dir() or (c / "nets").is_dir():
            return c
    return None


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded generator per test (reproducible)."""
    return np.random.default_rng(20190127)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder (golden outputs, public networks, MNIST/CIFAR samples): ``$RECURJAC_SHARED`` or a
    ``shared/`` folder beside a parent of the checkout.  Tests that need it are skipped when it is absent."""
    d = _find_shared()
    if d is None:
        pytest.skip("shared data folder not found (set RECURJAC_SHARED)")
    return d


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_blas():
    """One BLAS thread for the whole run: many small products are far slower with a thread pool on a shared
    2-core machine (the engine's own tasks set this themselves as well)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def client():
    """A real 2-process dask LocalCluster on loopback, with the engine's worker environment, for one test module."""
    distributed = pytest.importorskip("distributed")
    from recurjac_scale.engine.schedulers import WORKER_ENV

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address="127.0.0.1:0", env=dict(WORKER_ENV))
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()
