"""Cluster recipes: a ``dask.distributed`` Client on a laptop, on a local cluster, on SLURM, or on an existing
scheduler.

Nothing here computes bounds; these helpers only decide *where* the engine's tasks run.  Every recipe gives the
workers the same thread discipline (STACK.md): one BLAS / OpenMP / MKL thread per process and
``NUMBA_NUM_THREADS=1``, because the engine's parallelism comes from dask tasks, and nested thread pools inside
dask threads are up to 100x slower here (or abort the process, numba #8563).

Recipes
-------
- :func:`local_client` -- a ``LocalCluster`` of worker processes on the loopback interface (``127.0.0.1``), owned
  by the returned Client (closing the Client stops the cluster).
- :func:`connect` -- a Client for a scheduler already running (``dask scheduler`` / ``dask worker`` started by
  hand, or any other deployment): ``connect("tcp://host:8786")``.
- :func:`slurm_cluster` -- a ``dask_jobqueue.SLURMCluster`` (optional dependency, extra ``cluster``); scale it with
  ``cluster.scale(jobs=N)`` and attach ``Client(cluster)``.  :func:`slurm_job_script` shows the batch script it
  would submit without starting anything.
- :func:`get_client` -- one entry point for the command line: ``None`` (no client: the engine's in-process
  schedulers), ``"local"`` / ``"local:N"`` or ``workers=N`` (local cluster), ``"tcp://..."`` (connect).

Example
-------
>>> from recurjac_scale.cluster import local_client
>>> with local_client(n_workers=2, memory_limit="2GiB") as client:   # doctest: +SKIP
...     print(client.dashboard_link)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import contextlib
import os

import dask

from .errors import ClusterError, InputError, require

__all__ = [
    "THREAD_ENV",
    "MALLOC_ENV",
    "worker_env",
    "local_client",
    "connect",
    "slurm_cluster",
    "slurm_cluster_kwargs",
    "slurm_job_script",
    "get_client",
]

THREAD_ENV: dict[str, str] = {
    "NUMBA_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""Environment every worker process gets: one thread for numba's pool, OpenMP, OpenBLAS and MKL."""

MALLOC_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
}
"""glibc allocator settings for worker processes, opt-in (``local_client(env=MALLOC_ENV)``, or exported for workers
started by hand).  dask's default (``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes the mmap threshold at 128 KiB)
returns every freed array above 128 KiB to the system, so the next task's arrays are page-faulted in again.  The
recursion reuses its large per-row buffers from task to task (per-thread workspaces), which removed most of that
cost: the CIFAR F0 job in one process took 1.6x its default-allocator time under dask's setting before, 1.1x after.
With these settings (arrays below 32 MiB reused from the heap, at most 256 MiB of free heap kept) the rest goes too.
Not the default: the retained heap is not in the plan's memory model, and it pushed out-of-core workers (1.5 GiB
network, 1 GiB limit) over their limit, where dask's setting completes."""


def worker_env(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The worker environment: :data:`THREAD_ENV` updated with ``extra`` (values converted to ``str``; e.g.
    :data:`MALLOC_ENV` for faster workers with memory to spare).

    Parameters
    ----------
    extra : mapping, optional
        Additional variables, or overrides (e.g. ``{"OPENBLAS_CORETYPE": "Haswell"}``).

    Returns
    -------
    dict of str to str
    """
    env = dict(THREAD_ENV)
    for k, v in (extra or {}).items():
        env[str(k)] = str(v)
    return env


@contextlib.contextmanager
def _environ(updates: Mapping[str, str]):
    """Set environment variables for the duration of a block, then restore the previous values."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_positive_int(name: str, value) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not an integer; accepted: a positive integer") from None
    if v != value or v < 1:
        raise InputError(f"{name}={value!r} is invalid; accepted: a positive integer")
    return v


def local_client(
    n_workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str | int | float | None = "auto",
    *,
    processes: bool = True,
    dashboard: bool = False,
    env: Mapping[str, Any] | None = None,
    **cluster_kwargs,
):
    """Start a ``LocalCluster`` on ``127.0.0.1`` and return a Client that owns it.

    Parameters
    ----------
    n_workers : int
        Number of worker processes (or in-process workers when ``processes=False``).
    threads_per_worker : int
        Dask threads per worker; each task still uses one BLAS thread.
    memory_limit : str, int, float or None
        Per-worker memory limit: bytes, a string like ``"2GiB"``, a fraction of the machine's memory, ``"auto"``
        (memory / n_workers) or ``None`` / ``0`` for no limit.  Workers spill to disk at 60% and pause at 80%
        (dask defaults); the engine's own memory budget should be set below it.
    processes : bool
        Worker processes (default; the only way the thread environment below takes effect) or threads in this
        process (``protocol="tcp"`` is then set, as ``LocalCluster(processes=False, host="127.0.0.1")`` needs it).
    dashboard : bool
        Start the dashboard on a free loopback port (needs ``bokeh``); otherwise none is started.
    env : mapping, optional
        Extra worker environment on top of :data:`THREAD_ENV`.
    **cluster_kwargs
        Passed to ``distributed.LocalCluster`` (e.g. ``local_directory``).

    Returns
    -------
    distributed.Client
        Closing it (``client.close()`` or a ``with`` block) also stops the cluster.

    Notes
    -----
    The thread variables are installed both as the Nanny's ``env`` and in ``distributed.nanny.pre-spawn-environ``
    (variables such as ``OPENBLAS_NUM_THREADS`` are read when numpy is imported, which happens before the Nanny
    applies its ``env`` in the child), and they override the caller's own values of these variables while the
    cluster starts.  The calling process's ``os.environ`` is restored afterwards (a Nanny that restarts a dead
    worker sets them again, as dask does with its own defaults); libraries already loaded here are unaffected.
    """
    from distributed import Client

    n_workers = _check_positive_int("n_workers", n_workers)
    threads_per_worker = _check_positive_int("threads_per_worker", threads_per_worker)
    wenv = worker_env(env)
    kwargs = dict(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit if memory_limit is not None else 0,
        processes=processes,
        host="127.0.0.1",
        # The scheduler always runs an HTTP server; on a fixed port (8787) a second cluster on the same machine
        # would warn and move.  A free loopback port avoids that; the dashboard itself only when asked for.
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": bool(dashboard)},
    )
    if processes:
        kwargs["env"] = wenv
    else:
        kwargs["protocol"] = "tcp"
    kwargs.update(cluster_kwargs)
    pre_spawn = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    pre_spawn.update(wenv)
    # The Nanny reads pre-spawn variables from os.environ first and the config second, so a user's
    # OPENBLAS_NUM_THREADS=8 would win over the config: set them in os.environ while the cluster starts.
    # Client(address=None, **kwargs) starts a LocalCluster that the client owns and closes with itself.
    with _environ(wenv), dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
        return Client(**kwargs)


def connect(address: str, *, timeout: str | float = "30s"):
    """A Client for a running scheduler, e.g. ``"tcp://10.0.0.5:8786"`` (``dask scheduler`` started by hand).

    The workers' environment is whatever their launcher gave them: start them with :func:`worker_env` exported
    (see the README, "Running at scale").  The package must be importable on the scheduler and every worker.

    A ``tls://`` scheduler needs dask's TLS configuration (``distributed.comm.tls.ca-file``,
    ``distributed.comm.tls.client.cert`` / ``.key``, e.g. from ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``): the client
    is built with ``Security()``, which reads it.

    Raises
    ------
    InputError
        If ``address`` is not a ``scheme://host:port`` string.
    ClusterError
        If no scheduler can be reached there (with a hint for ``tls://`` without TLS configuration).
    """
    from distributed import Client

    if not isinstance(address, str) or "://" not in address:
        raise InputError(f"scheduler address {address!r} is invalid; accepted: 'tcp://host:port' (or tls://, ws://)")
    try:
        return Client(address, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is reported the same way, on one line
        hint = ""
        if address.startswith("tls://"):
            hint = ("; a tls:// scheduler needs dask's TLS configuration (distributed.comm.tls.ca-file, "
                    "distributed.comm.tls.client.cert and .key)")
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise ClusterError(
            f"cannot connect to the dask scheduler at {address!r} ({type(exc).__name__}: {detail}){hint}"
        ) from None


def slurm_cluster_kwargs(
    *,
    queue: str | None = None,
    account: str | None = None,
    cores: int = 1,
    processes: int | None = None,
    memory: str = "4GiB",
    walltime: str = "01:00:00",
    job_extra_directives: Sequence[str] = (),
    env: Mapping[str, Any] | None = None,
    prologue: Sequence[str] = (),
    interface: str | None = None,
    local_directory: str | None = None,
    log_directory: str | None = None,
    python: str | None = None,
    job_name: str = "recurjac",
    **extra,
) -> dict:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for one RecurJac worker job.

    Parameters
    ----------
    queue, account : str, optional
        SLURM partition (``#SBATCH -p``) and account (``#SBATCH -A``).
    cores : int
        Cores per job (``--cpus-per-task``); also the number of dask threads per job.
    processes : int, optional
        Worker processes per job (default: one per core, each with one thread: no GIL contention, one BLAS
        thread each).
    memory : str
        Memory per job (``--mem``); split evenly between the job's worker processes.
    walltime : str
        ``#SBATCH -t``, e.g. ``"02:00:00"``.
    job_extra_directives : sequence of str
        Additional ``#SBATCH`` options, e.g. ``["--constraint=avx512", "--exclusive"]``.
    env : mapping, optional
        Extra environment on top of :data:`THREAD_ENV`, exported in the job script before the worker starts.
    prologue : sequence of str
        Shell lines run before the worker (e.g. ``"module load python"``, ``"source venv/bin/activate"``).
    interface : str, optional
        Network interface of the workers and scheduler (e.g. ``"ib0"``).
    local_directory, log_directory : str, optional
        Worker spill directory (node-local disk) and where SLURM writes the job logs.
    python : str, optional
        Python executable on the compute nodes (default: this one).
    job_name : str
    **extra
        Passed through unchanged (e.g. ``scheduler_options``, ``death_timeout``).

    Returns
    -------
    dict
    """
    cores = _check_positive_int("cores", cores)
    if processes is None:
        processes = cores
    processes = _check_positive_int("processes", processes)
    if processes > cores:
        raise InputError(f"processes={processes} exceeds cores={cores}; accepted: 1 <= processes <= cores")
    lines = [f"export {k}={v}" for k, v in worker_env(env).items()]
    kwargs: dict[str, Any] = dict(
        queue=queue,
        account=account,
        cores=cores,
        processes=processes,
        memory=memory,
        walltime=walltime,
        job_extra_directives=list(job_extra_directives),
        job_script_prologue=list(prologue) + lines,
        job_name=job_name,
    )
    for name, value in (
        ("interface", interface),
        ("local_directory", local_directory),
        ("log_directory", log_directory),
        ("python", python),
    ):
        if value is not None:
            kwargs[name] = value
    kwargs.update(extra)
    return kwargs


def slurm_cluster(**kwargs):
    """A ``dask_jobqueue.SLURMCluster`` with :func:`slurm_cluster_kwargs` applied (no job submitted yet).

    Call ``cluster.scale(jobs=N)`` to submit N worker jobs and ``distributed.Client(cluster)`` to use them; the
    scheduler runs in this process, so start it on a node the compute nodes can reach (a login node, or the
    first node of an allocation).  See ``scripts/slurm_job.py``.

    Raises
    ------
    MissingDependencyError
        If ``dask_jobqueue`` is not installed (``pip install recurjac-scale[cluster]``).
    """
    jq = require("dask_jobqueue", "cluster")
    return jq.SLURMCluster(**slurm_cluster_kwargs(**kwargs))


def slurm_job_script(**kwargs) -> str:
    """The ``sbatch`` script :func:`slurm_cluster` would submit for one job, without starting a scheduler.

    The scheduler address in the script is a placeholder (``tcp://SCHEDULER:8786``).
    """
    jq = require("dask_jobqueue", "cluster")
    kw = slurm_cluster_kwargs(**kwargs)
    kw.pop("scheduler_options", None)
    name = kw.pop("job_name")
    return jq.SLURMCluster.job_cls(scheduler="tcp://SCHEDULER:8786", name="recurjac-worker", job_name=name,
                                   **kw).job_script()


def get_client(scheduler: str | None = None, *, workers: int | None = None, memory_limit="auto",
               connect_timeout: str | float = "30s", **kwargs):
    """One entry point for the command line's ``--scheduler`` / ``--workers`` options.

    Parameters
    ----------
    scheduler : str or None
        ``None``, ``"threads"``, ``"processes"`` or ``"synchronous"``: no Client (the engine uses dask's
        in-process schedulers) unless ``workers`` is given; ``"local"`` or ``"local:N"``: a local cluster of N
        workers (default ``workers`` or 2); ``"tcp://host:port"`` (any ``scheme://``): connect.
    workers : int, optional
        Worker count of a local cluster.
    memory_limit
        Per-worker memory limit of a local cluster (see :func:`local_client`).
    connect_timeout : str or float
        How long to wait for a scheduler given by address (seconds, or a dask time string).
    **kwargs
        Passed to :func:`local_client`.

    Returns
    -------
    distributed.Client or None
        A Client (the caller closes it), or ``None`` for the in-process schedulers.

    Raises
    ------
    InputError
        For an unrecognised scheduler string, or ``workers`` combined with a remote address.
    """
    if scheduler is not None and not isinstance(scheduler, str):
        raise InputError(f"scheduler={scheduler!r} must be a string")
    s = None if scheduler is None else scheduler.strip()
    if s and "://" in s:
        if workers is not None:
            raise InputError("--workers starts a local cluster; it cannot be combined with a scheduler address")
        return connect(s, timeout=connect_timeout)
    if s in (None, "", "threads", "processes", "synchronous", "sync", "single-threaded"):
        if workers is None:
            return None
        return local_client(workers, memory_limit=memory_limit, **kwargs)
    if s == "local" or s.startswith("local:"):
        n = workers if workers is not None else 2
        if s.startswith("local:"):
            n = s.split(":", 1)[1]
            try:
                n = int(n)
            except ValueError:
                raise InputError(f"scheduler={scheduler!r}: the worker count after 'local:' is not an integer") from None
        return local_client(n, memory_limit=memory_limit, **kwargs)
    raise InputError(
        f"unknown scheduler {scheduler!r}; accepted: synchronous, threads, processes, local, local:N, tcp://host:port"
    )

