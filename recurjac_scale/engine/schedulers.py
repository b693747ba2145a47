"""Where the blocks of a plan run: dask's local schedulers or a ``dask.distributed`` cluster.

One registry of scheduler kinds (:data:`SCHEDULERS`): ``synchronous`` (one thread, for debugging), ``threads``
(default: one process, a thread pool), ``processes`` (dask's multiprocessing scheduler) and ``distributed`` (a
cluster given by address ``tcp://host:port``, or a ``LocalCluster`` of ``workers`` worker processes started here
on 127.0.0.1).  :func:`open_executor` is a context manager giving an :class:`Executor` with one method, ``run``,
that computes a low-level dask graph and returns the requested keys' values.

Threads inside tasks: every task limits BLAS to one thread (``threadpoolctl``, see :func:`blas_single_thread`);
numba kernels never use ``parallel=True``; ``NUMBA_NUM_THREADS=1`` and the BLAS variables are set for every worker
process started here (the distributed nanny limits OMP/MKL/OpenBLAS threads but not numba's).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..cluster import THREAD_ENV, _environ
from ..errors import ClusterError, InputError

__all__ = [
    "SCHEDULERS",
    "Executor",
    "open_executor",
    "blas_single_thread",
    "WORKER_ENV",
    "parse_scheduler",
    "connect",
    "CONNECT_TIMEOUT",
]

CONNECT_TIMEOUT = 30.0
"""Seconds to wait for a scheduler given by address to answer (``--connect-timeout``)."""


def connect(address: str, timeout: float | None = None):
    """A ``distributed.Client`` connected to ``address``.

    Raises
    ------
    ClusterError
        When the scheduler does not answer within ``timeout`` seconds (default :data:`CONNECT_TIMEOUT`), refuses
        the connection, or answers with something that is not the dask protocol.
    """
    import asyncio

    from distributed import Client

    timeout = CONNECT_TIMEOUT if timeout is None else float(timeout)
    if not (timeout > 0):
        raise InputError(f"connect timeout {timeout!r}: give a positive number of seconds")
    try:
        # Client(timeout=...) bounds the TCP connect only: an endpoint that accepts and then stays silent makes
        # it wait forever.  Ask the scheduler who it is first, under a hard deadline.
        asyncio.run(asyncio.wait_for(_identity(address, timeout), timeout))
        return Client(address, timeout=timeout, set_as_default=False)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is reported the same way
        # (an endpoint that answers with something else than dask's protocol can surface as MemoryError too)
        raise ClusterError(
            f"no dask scheduler answered at {address!r} within {timeout:g} s ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the address and that the scheduler "
            "runs, or raise --connect-timeout"
        ) from None

WORKER_ENV = dict(THREAD_ENV)
"""Environment of worker processes started by the engine: one thread per BLAS / numba / OpenMP pool."""

_limit_lock = threading.Lock()
_limit_depth = 0
_limit_restore = None
_controller = None
_controller_modules = -1


async def _identity(address: str, timeout: float) -> dict:
    """The scheduler's answer to the ``identity`` request (raises on no answer or a non-dask endpoint)."""
    from distributed.comm import connect as comm_connect
    from distributed.security import Security

    # the same TLS settings as the Client made next (Security() reads dask's distributed.comm.tls configuration)
    comm = await comm_connect(address, timeout=timeout, **Security().get_connection_args("client"))
    try:
        await comm.write({"op": "identity"})
        reply = await comm.read()
    finally:
        comm.abort()
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        raise OSError(f"the endpoint is not a dask scheduler (answered {str(reply)[:60]!r})")
    return reply


def _blas_controller():
    """The process's ``threadpoolctl.ThreadpoolController`` (the scan of the loaded libraries costs milliseconds,
    once per task otherwise), rebuilt whenever a module was imported since: a BLAS or OpenMP library loaded by a
    new import is then found too.  Call with ``_limit_lock`` held."""
    global _controller, _controller_modules
    n = len(sys.modules)
    if _controller is None or n != _controller_modules:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
        _controller_modules = n
    return _controller


@contextlib.contextmanager
def blas_single_thread():
    """Limit BLAS (and OpenMP) to one thread for the duration of a task.

    Dask supplies the parallelism; multi-threaded BLAS inside many small calls or inside dask threads is
    pathological (STACK.md: up to 100x slower).  The limit is process-wide, so concurrent tasks of a thread pool
    share one reference-counted limit: the first task to enter sets it, the last to leave restores the previous
    setting (a plain ``threadpool_limits`` per task would let one task's exit lift the limit under another).
    """
    global _limit_depth, _limit_restore
    with _limit_lock:
        if _limit_depth == 0:
            _limit_restore = _blas_controller().limit(limits=1)
        _limit_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0 and _limit_restore is not None:
                _limit_restore.restore_original_limits()
                _limit_restore = None


@dataclass
class Executor:
    """Runs low-level dask graphs on one scheduler.

    Attributes
    ----------
    kind : str
        ``synchronous``, ``threads``, ``processes`` or ``distributed``.
    n_workers : int
        Worker processes (1 for the single-process schedulers).
    threads_per_worker : int
    client : distributed.Client or None
    dashboard_link : str or None
    address : str or None
    memory_limit : int or None
        Smallest ``memory_limit`` of the cluster's workers (bytes), if any.
    """

    kind: str
    n_workers: int = 1
    threads_per_worker: int = 1
    client: Any = None
    dashboard_link: str | None = None
    address: str | None = None
    memory_limit: int | None = None
    _get: Callable | None = field(default=None, repr=False)

    @property
    def total_threads(self) -> int:
        return self.n_workers * self.threads_per_worker

    def run(self, dsk: dict, keys: list, *, callbacks=(), distributed_progress: bool = False) -> list:
        """Compute ``keys`` of the graph ``dsk``; returns their values in order.

        ``callbacks`` are dask local-scheduler callbacks (ignored under a Client); ``distributed_progress`` shows
        ``distributed.progress`` while a Client computes.
        """
        if self.client is not None:
            futures = self.client.get(dsk, keys, sync=False)
            if distributed_progress:
                from distributed import progress

                # distributed's text bar writes to stdout; keep stdout for results (e.g. --json)
                with contextlib.redirect_stdout(sys.stderr):
                    progress(futures)
                print(file=sys.stderr)
            return self.client.gather(futures)
        from dask.callbacks import add_callbacks

        # In-process schedulers: also limit BLAS from this (the calling) thread for the whole graph.  Measured
        # here: once OpenBLAS has run in the main thread, a limit set from a pool thread is not seen by other
        # threads (threadpool_info reports 2 inside tasks), while a limit set by the caller is.
        with add_callbacks(*callbacks), blas_single_thread():
            return self._get(dsk, keys)

    def describe(self) -> dict:
        return {
            "scheduler": self.kind,
            "n_workers": self.n_workers,
            "threads_per_worker": self.threads_per_worker,
            "address": self.address,
            "dashboard": self.dashboard_link,
            "memory_limit": self.memory_limit,
        }


def _sync(n_workers, threads, memory_limit) -> Iterator[Executor]:
    import dask.local

    yield Executor("synchronous", 1, 1, _get=dask.local.get_sync)


def _threads(n_workers, threads, memory_limit) -> Iterator[Executor]:
    import dask.threaded

    n = threads or os.cpu_count() or 1

    def get(dsk, keys):
        return dask.threaded.get(dsk, keys, num_workers=n)

    yield Executor("threads", 1, n, _get=get)


def _processes(n_workers, threads, memory_limit) -> Iterator[Executor]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import dask.multiprocessing

    n = n_workers or os.cpu_count() or 1
    # One pool for the executor's lifetime (worker start-up, imports and numba cache loads are paid once);
    # spawned children inherit the one-thread environment.
    with _environ(WORKER_ENV):
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))

    def get(dsk, keys):
        return dask.multiprocessing.get(dsk, keys, num_workers=n, pool=pool)

    try:
        yield Executor("processes", n, 1, _get=get)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _distributed(address, n_workers, threads, memory_limit, dashboard, timeout=None) -> Iterator[Executor]:
    from distributed import Client, LocalCluster

    if address:
        with connect(address, timeout) as client:
            info = client.scheduler_info()
            workers = info.get("workers", {})
            nthreads = [w.get("nthreads", 1) for w in workers.values()] or [1]
            yield Executor(
                "distributed",
                max(1, len(workers)),
                max(1, int(max(nthreads))),
                client=client,
                dashboard_link=_dashboard(client),
                address=address,
                memory_limit=_min_limit(workers),
            )
        return
    n = n_workers or 1
    tpw = threads or 1
    if not memory_limit:
        # never dask's "auto" (the machine's total memory per worker): what is available now, with a margin
        from .memory import default_memory_budget, local_memory_limit

        memory_limit = local_memory_limit(default_memory_budget(n)[0])
    kw: dict[str, Any] = {"memory_limit": int(memory_limit)}
    with LocalCluster(
        n_workers=n,
        threads_per_worker=tpw,
        processes=True,
        host="127.0.0.1",
        # every server (scheduler, workers, dashboard) on the loopback interface, on free ports
        dashboard_address="127.0.0.1:0",
        env=dict(WORKER_ENV),
        **kw,
    ) as cluster, Client(cluster) as client:
        yield Executor(
            "distributed",
            n,
            tpw,
            client=client,
            dashboard_link=_dashboard(client) if dashboard else None,
            address=cluster.scheduler_address,
            memory_limit=_min_limit(client.scheduler_info(n_workers=-1).get("workers", {})),
        )


def _min_limit(workers: dict) -> int | None:
    limits = [int(w["memory_limit"]) for w in workers.values() if w.get("memory_limit")]
    return min(limits) if limits else None


def _dashboard(client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing) is not an error
        return None


SCHEDULERS: dict[str, Callable] = {
    "synchronous": _sync,
    "sync": _sync,
    "threads": _threads,
    "processes": _processes,
}
"""Registry of the local scheduler kinds: name -> generator of an :class:`Executor`."""


def parse_scheduler(scheduler: str | None, workers: int | None) -> tuple[str, str | None]:
    """Normalise ``(scheduler, workers)`` to ``(kind, address)``.

    ``workers`` given without a scheduler (or with ``distributed``) starts a LocalCluster; a ``tcp://`` / ``tls://``
    address connects to a running cluster.

    Raises
    ------
    InputError
        For an unknown scheduler name or ``workers < 1``.
    """
    if workers is not None and int(workers) < 1:
        raise InputError(f"workers={workers!r}: need at least 1 worker")
    s = (scheduler or "").strip()
    if "://" in s:
        return "distributed", s
    s = s.lower()
    if s in ("", "default"):
        return ("distributed", None) if workers else ("threads", None)
    if s in ("distributed", "local-cluster", "localcluster"):
        return "distributed", None
    if s in SCHEDULERS:
        return ("synchronous" if s == "sync" else s), None
    raise InputError(
        f"unknown scheduler {scheduler!r}; accepted: synchronous, threads, processes, distributed (a LocalCluster of "
        "--workers N), or a cluster address tcp://host:port"
    )


@contextlib.contextmanager
def open_executor(
    scheduler: str | None = "threads",
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: int | None = None,
    dashboard: bool = True,
    client=None,
    connect_timeout: float | None = None,
) -> Iterator[Executor]:
    """Context manager giving an :class:`Executor`.

    Parameters
    ----------
    scheduler : str
        ``synchronous``, ``threads`` (default), ``processes``, ``distributed`` or a cluster address.
    workers : int, optional
        Worker processes (``processes``: pool size; ``distributed``: LocalCluster size, default 1).
    threads_per_worker : int, optional
        Threads per worker (``threads``: pool size, default the CPU count; LocalCluster default 1).
    memory_limit : int, optional
        Bytes per LocalCluster worker (default: :func:`~recurjac_scale.engine.memory.local_memory_limit` of the
        machine's default budget, :func:`~recurjac_scale.engine.memory.default_memory_budget`).
    dashboard : bool
        Start the dashboard of a LocalCluster (on 127.0.0.1, a free port).
    client : distributed.Client, optional
        Use this client (any ``scheduler`` value is ignored).
    connect_timeout : float, optional
        Seconds to wait for a scheduler given by address (default :data:`CONNECT_TIMEOUT`); then
        :class:`~recurjac_scale.errors.ClusterError`.
    """
    if client is not None:
        info = client.scheduler_info()
        ws = info.get("workers", {})
        yield Executor(
            "distributed",
            max(1, len(ws)),
            max([w.get("nthreads", 1) for w in ws.values()] or [1]),
            client=client,
            dashboard_link=_dashboard(client),
            address=getattr(client.scheduler, "address", None),
        )
        return
    kind, address = parse_scheduler(scheduler, workers)
    if kind == "distributed":
        gen = _distributed(address, workers, threads_per_worker, memory_limit, dashboard, connect_timeout)
    else:
        gen = SCHEDULERS[kind](workers, threads_per_worker, memory_limit)
    with contextlib.contextmanager(lambda: gen)() as ex:
        yield ex
