"""Batch jobs: certify / landscape / lipschitz over many inputs and targets, as dask tasks, with a resumable
JSON-lines store.

Work
----
One task per item: ``(input, target)`` for ``certify``, ``(input, output)`` for ``landscape``, one input for
``lipschitz``.  Tasks run on dask's in-process schedulers (``synchronous``, ``threads``, ``processes``) or on a
``dask.distributed`` cluster (``--workers N`` starts a local one on 127.0.0.1, ``tcp://host:port`` connects;
:func:`recurjac_scale.cluster.get_client`).  Worker processes open the model store themselves, once per process.
A task that dies with its worker is rerun elsewhere by the distributed scheduler; records do not depend on which
worker computed them or in which order (random targets are seeded per input).

The store (stable format, version 1)
------------------------------------
A text file, one JSON object per line:

1. the header ``{"format": "recurjac-scale-batch", "version": 1, "job_id": SHA256, "job": {...}}``: ``job`` is
   everything the results depend on (command, model path and a digest of its weights, a digest of the inputs,
   labels, indices and boxes, the options); ``job_id`` is the SHA-256 of its canonical JSON;
2. one record per item, ``{"key": ..., ..., "checksum": SHA256}``, where the checksum is the SHA-256 of the
   record's canonical JSON without the checksum (``json.dumps(rec, sort_keys=True, separators=(",", ":"))``);
3. when the batch is complete, a last line ``{"summary": {...}}``.

Records are appended (flushed) as items finish.  Rerunning the same job resumes: records whose checksum verifies
are reused, corrupted or truncated lines and failed records are recomputed, and a store whose ``job_id`` differs
is refused (:class:`~recurjac_scale.errors.StoreError`) unless ``overwrite``.  At the end the file is rewritten
(under a temporary name, then renamed) with the records in batch order and the summary, so an interrupted and
resumed batch ends with the same records as an uninterrupted one (``time_s`` fields aside).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..cluster import MALLOC_ENV
from ..errors import InputError, RecurJacError, StoreError
from ..paths import write_atomic

__all__ = [
    "FORMAT",
    "VERSION",
    "BatchJob",
    "BatchResult",
    "KINDS",
    "run_batch",
    "record_checksum",
    "read_store",
    "summarize",
]

FORMAT = "recurjac-scale-batch"
VERSION = 1


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def record_checksum(rec: dict) -> str:
    """SHA-256 of the record's canonical JSON, without its ``checksum`` field."""
    body = {k: v for k, v in rec.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return v


# -- the kinds of job -----------------------------------------------------------------------------------------

_MODELS: dict = {}


def _network(model):
    """The network of a task: a Network as given, or a store path opened once per process."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    key = str(model)
    if key not in _MODELS:
        import dask

        from ..network.store_read import open_network

        # read with the synchronous scheduler: never back to the cluster from inside a task (on a worker whose
        # configuration names the distributed scheduler, compute() would look for a client there)
        with dask.config.set(scheduler="synchronous"):
            _MODELS[key] = open_network(key).materialize()
    return _MODELS[key]


def _certify_item(net, x, label, index, target, opts) -> dict:
    from .certify import certify

    r = certify(net, x, label, target, opts["p"], method=opts["method"], layer_bounds=opts["layer_bounds"],
                search=opts["search"], margin_bound=opts["margin_bound"], seed=opts["seed"], index=index)
    d = r.to_dict()
    d["target_kind"] = str(target)
    return d


def _landscape_item(net, x, label, index, output, opts) -> dict:
    from .landscape import landscape_radius

    out = None if output in (None, "predicted") else int(output)
    r = landscape_radius(net, x, out, opts["p"], method=opts["method"], layer_bounds=opts["layer_bounds"])
    d = r.to_dict()
    d["prediction"] = int(np.argmax(net.forward(x)))
    d["label"] = None if label is None else int(label)
    d["target"] = d["output"]
    return d


def _lipschitz_item(net, x, label, index, _target, opts) -> dict:
    from .sweeps import lipschitz_sweep

    t0 = time.perf_counter()
    r = lipschitz_sweep(net, x, opts["eps"], opts["methods"], opts["p"], layer_bounds=opts["layer_bounds"],
                        outputs=opts.get("outputs"), include_global=opts.get("include_global", True))
    d = r.to_dict()
    d["prediction"] = int(np.argmax(net.forward(x)))
    d["label"] = None if label is None else int(label)
    d["target"] = None
    d["method"] = ",".join(r.values)
    d["time_s"] = time.perf_counter() - t0
    return d


KINDS: dict[str, Callable] = {"certify": _certify_item, "landscape": _landscape_item, "lipschitz": _lipschitz_item}
"""Registry: job kind -> ``fn(network, x, label, index, target, options) -> record fields``."""


BATCH_WORKER_ENV = dict(MALLOC_ENV)
"""Environment of the worker processes of a local cluster that a batch command starts itself (``--workers N``):
glibc keeps freed arrays below 32 MiB for reuse (at most 256 MiB of free heap retained,
:data:`recurjac_scale.cluster.MALLOC_ENV`).  Under dask's default setting every mid-sized array of a task is
page-faulted in again, and a MNIST certify item took about 1.8x the CPU time in a worker that it takes in the
client."""

BATCH_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
"""dask configuration of those workers (shipped by their Nanny): no statistical profiler sampling every task's
stack every 10 ms (about 14 % of the workers' CPU time on a MNIST certify batch); it only feeds the dashboard's
profile page."""


def run_item(kind: str, model, x, label, index: int, target, opts: dict, box=None) -> dict:
    """Compute one record (a dask task).  Bad input of one item gives a failed record (``error``), not a crash
    of the batch."""
    t0 = time.perf_counter()
    net = _network(model)
    try:
        if box is not None:
            from .inputs import box_network

            net, x = box_network(net, box[0], box[1])
        fields = KINDS[kind](net, np.asarray(x, dtype=np.float64), label, index, target, opts)
        fields["failed"] = False
    except RecurJacError as exc:
        fields = {"failed": True, "error": str(exc), "label": None if label is None else int(label),
                  "prediction": None, "target": None, "time_s": time.perf_counter() - t0}
    rec = {"key": _item_key(index, target), "kind": kind, "index": int(index)}
    rec.update(_jsonable(fields))
    rec["checksum"] = record_checksum(rec)
    return rec


def _item_key(index: int, target) -> str:
    return f"{int(index)}:{target}"


# -- the job --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchJob:
    """A batch: kind, model, inputs and options.

    Attributes
    ----------
    kind : str
        ``certify``, ``landscape`` or ``lipschitz`` (:data:`KINDS`).
    model : str or Network
        A model store path (needed for worker processes) or an in-memory network (threads only).
    x : ndarray, shape (N, n_0)
        Inputs (box centres when ``boxes`` is given).
    labels : ndarray of int (N,) or None
    indices : tuple of int
        Record ``index`` of each input (its position in the input file).
    targets : tuple
        Per input, the targets (``certify``: kinds or class indices) or outputs (``landscape``); ``(None,)`` for
        ``lipschitz``.
    options : dict
        Kind-specific options (method, layer_bounds, p, search, seed, eps, methods, ...); JSON-able.
    boxes : tuple of ndarray (lower, upper) of shape (N, n_0), or None
    description : dict
        Extra job fields for the header (model path, input source).
    """

    kind: str
    model: object
    x: np.ndarray
    labels: np.ndarray | None
    indices: tuple
    targets: tuple
    options: dict
    boxes: tuple | None = None
    description: dict = field(default_factory=dict)

    def items(self) -> list[tuple]:
        """``(position, target)`` pairs in batch order."""
        return [(i, t) for i in range(len(self.indices)) for t in self.targets]

    def key(self, pos: int, target) -> str:
        return _item_key(self.indices[pos], target)

    def to_dict(self) -> dict:
        d = {
            "kind": self.kind,
            "inputs_sha256": _digest(self.x),
            "labels": None if self.labels is None else [int(v) for v in self.labels],
            "indices": [int(i) for i in self.indices],
            "targets": [t if t is None or isinstance(t, (int, str)) else str(t) for t in self.targets],
            "options": _jsonable(dict(self.options)),
            "boxes_sha256": None if self.boxes is None else _digest(*self.boxes),
        }
        if self.kind == "certify":
            from .search import SEARCH_REVISIONS

            d["search_revision"] = SEARCH_REVISIONS.get(str(self.options.get("search")))
        d.update(_jsonable(dict(self.description)))
        return d

    @property
    def job_id(self) -> str:
        return hashlib.sha256(_canonical(self.to_dict()).encode()).hexdigest()


@dataclass(frozen=True)
class BatchResult:
    """Records (batch order), the summary, and how many records were reused from the store."""

    records: tuple
    summary: dict
    reused: int
    computed: int
    recomputed_corrupt: int

    def to_dict(self) -> dict:
        return {"records": list(self.records), "summary": self.summary}


# -- the store ------------------------------------------------------------------------------------------------


def read_store(path, job: BatchJob | None = None) -> tuple[dict | None, dict, int]:
    """Read a store: ``(header, {key: record}, n_corrupt)``.  Records with a wrong checksum, unparsable lines and
    failed records are dropped (``n_corrupt`` counts the first two).

    Raises
    ------
    StoreError
        The file is not a batch store, or (with ``job``) belongs to a different job.
    """
    p = Path(path)
    lines = p.read_text(errors="replace").splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StoreError(f"{str(p)!r} is not a recurjac-scale batch store; pass --overwrite to replace it")
    if int(header.get("version", 0)) > VERSION:
        raise StoreError(f"{str(p)!r} has batch store version {header.get('version')}; this version reads <= {VERSION}")
    if job is not None and header.get("job_id") != job.job_id:
        old, new = header.get("job", {}), job.to_dict()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise StoreError(
            f"{str(p)!r} holds results of a different job (differs in: {', '.join(diff) or 'job id'}); "
            "pass --overwrite to start afresh, or choose another output"
        )
    records, corrupt = {}, 0
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            corrupt += 1
            continue
        if not isinstance(rec, dict) or "summary" in rec:
            continue
        if rec.get("checksum") != record_checksum(rec) or "key" not in rec:
            corrupt += 1
            continue
        if rec.get("failed"):
            continue
        records[rec["key"]] = rec
    return header, records, corrupt


def _write_lines(path: Path, objs) -> None:
    write_atomic(path, lambda fh: fh.writelines(_canonical(o) + "\n" for o in objs))


# -- summaries ------------------------------------------------------------------------------------------------


def _stats(values) -> dict:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    if not vals:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": statistics.fmean(vals), "median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def summarize(kind: str, records, n_inputs: int, wall_s: float) -> dict:
    """The summary line: counts, mean / median of the main quantity, time per input, misclassified, failed."""
    recs = list(records)
    ok = [r for r in recs if not r.get("failed")]
    failed = len(recs) - len(ok)
    mis_inputs = sorted({r["index"] for r in ok if r.get("misclassified")})
    s = {
        "kind": kind,
        "inputs": n_inputs,
        "records": len(recs),
        "failed": failed,
        "misclassified": len(mis_inputs),
        "misclassified_indices": mis_inputs,
        "time_s_total": sum(float(r.get("time_s") or 0.0) + float(r.get("margin_bound_time_s") or 0.0) for r in recs),
        "wall_s_this_run": wall_s,
    }
    s["time_s_per_input"] = s["time_s_total"] / n_inputs if n_inputs else None
    if kind == "certify":
        good = [r for r in ok if not r.get("misclassified")]
        by_target = {}
        for r in good:
            by_target.setdefault(str(r.get("target_kind")), []).append(r)
        s["radius"] = _stats(r["radius"] for r in good)
        s["margin_bound_radius"] = _stats(r["margin_bound_radius"] for r in good)
        s["by_target"] = {t: {"count": len(rs), "radius": _stats(r["radius"] for r in rs),
                              "margin_bound_radius": _stats(r["margin_bound_radius"] for r in rs)}
                          for t, rs in sorted(by_target.items())}
    elif kind == "landscape":
        finite = [r["r_star"] for r in ok if r.get("r_star") != "inf"]
        s["r_star"] = _stats(finite)
        s["r_star_inf"] = sum(1 for r in ok if r.get("r_star") == "inf")
    elif kind == "lipschitz":
        per = {}
        for r in ok:
            for m, vals in r.get("lipschitz", {}).items():
                per.setdefault(m, []).append(vals)
        s["lipschitz_median"] = {
            m: [statistics.median([float(v[i]) for v in vs if v[i] != "inf"] or [math.inf]) for i in range(len(vs[0]))]
            for m, vs in per.items()
        }
        s["lipschitz_median"] = _jsonable(s["lipschitz_median"])
    return _jsonable(s)


# -- running --------------------------------------------------------------------------------------------------


def _model_ref(job: BatchJob, in_process: bool):
    if in_process or not hasattr(job.model, "weights"):
        return job.model
    raise InputError("worker processes need the model as a store path, not an in-memory network")


def run_batch(
    job: BatchJob,
    output: str | os.PathLike | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit="auto",
    client=None,
    overwrite: bool = False,
    on_record: Callable[[dict, int, int], None] | None = None,
    connect_timeout: float = 30.0,
) -> BatchResult:
    """Run (or resume) a batch and return its records in batch order.

    Parameters
    ----------
    job : BatchJob
    output : path, optional
        The JSON-lines store (see the module docstring); ``None``: results only in memory, no resume.
    scheduler : str, optional
        ``synchronous``, ``threads`` (default), ``processes``, ``local`` / ``local:N``, or ``tcp://host:port``.
    workers : int, optional
        Worker processes: with ``scheduler`` None starts a local dask cluster; with ``processes`` the pool size.
    threads_per_worker : int, optional
        Threads of the ``threads`` pool (default the CPU count) or per cluster worker (default 1).
    memory_limit
        Per-worker memory limit of a local cluster (``--memory-budget``).
    client : distributed.Client, optional
        Use this client.
    overwrite : bool
        Discard an existing store (of this or another job).
    on_record : callable, optional
        ``on_record(record, done, total)`` after each record (the command line's progress bar).
    connect_timeout : float
        Seconds to wait for a scheduler given by address.  If it cannot be reached, nothing is computed and a store
        this call created is removed again.

    Raises
    ------
    StoreError
        The output holds another job's results (and ``overwrite`` is False).
    """
    t_start = time.perf_counter()
    items = job.items()
    total = len(items)
    records: dict = {}
    corrupt = 0
    out = Path(output) if output is not None else None
    header = {"format": FORMAT, "version": VERSION, "job_id": job.job_id, "job": job.to_dict()}
    created = out is not None and not out.exists()
    if out is not None:
        if out.exists() and not overwrite:
            _, records, corrupt = read_store(out, job)
            wanted = {job.key(i, t) for i, t in items}
            records = {k: v for k, v in records.items() if k in wanted}
        elif not out.parent.exists():
            raise InputError(f"folder {str(out.parent)!r} for output {str(out)!r} does not exist")
        _write_lines(out, [header, *[records[job.key(i, t)] for i, t in items if job.key(i, t) in records]])
    reused = len(records)
    todo = [(i, t) for i, t in items if job.key(i, t) not in records]
    fh = open(out, "a") if out is not None else None
    done = [reused]

    def accept(rec):
        records[rec["key"]] = rec
        if fh is not None:
            fh.write(_canonical(rec) + "\n")
            fh.flush()
        done[0] += 1
        if on_record is not None:
            on_record(rec, done[0], total)

    def args_of(pos, target, model):
        box = None if job.boxes is None else (job.boxes[0][pos], job.boxes[1][pos])
        lab = None if job.labels is None else int(job.labels[pos])
        return (job.kind, model, job.x[pos], lab, int(job.indices[pos]), target, dict(job.options), box)

    try:
        if todo:
            _execute(job, todo, args_of, accept, scheduler, workers, threads_per_worker, memory_limit, client,
                     connect_timeout)
    except BaseException:
        if fh is not None:
            fh.close()
            fh = None
            if created and not records:
                # nothing was computed (e.g. the scheduler could not be reached): leave no store behind that
                # looks like a started job
                out.unlink(missing_ok=True)
        raise
    finally:
        if fh is not None:
            fh.close()
    ordered = [records[job.key(i, t)] for i, t in items]
    summary = summarize(job.kind, ordered, len(job.indices), time.perf_counter() - t_start)
    summary["reused"] = reused
    summary["corrupt_recomputed"] = corrupt
    if out is not None:
        _write_lines(out, [header, *ordered, {"summary": summary}])
    return BatchResult(tuple(ordered), summary, reused, len(todo), corrupt)


def _execute(job, todo, args_of, accept, scheduler, workers, tpw, memory_limit, client, connect_timeout=30.0):
    from ..cluster import get_client

    s = (scheduler or "").strip().lower()
    own = None
    if client is None and ("://" in s or s.startswith("local") or s == "distributed" or (workers and s in ("", "threads"))):
        if s == "distributed":
            s = "local"
        import dask
        import distributed  # noqa: F401  (its defaults loaded first: leaving the block below restores only our keys)

        with dask.config.set(BATCH_WORKER_CONFIG):
            own = client = get_client(s or None, workers=workers, memory_limit=memory_limit or "auto",
                                      threads_per_worker=tpw or 1, env=BATCH_WORKER_ENV,
                                      connect_timeout=connect_timeout)
    try:
        if client is not None:
            return _run_distributed(job, todo, args_of, accept, client)
        return _run_local(job, todo, args_of, accept, s or "threads", workers, tpw)
    finally:
        if own is not None:
            own.close()


def _run_distributed(job, todo, args_of, accept, client):
    from distributed import as_completed

    model = job.model if isinstance(job.model, (str, os.PathLike)) else client.scatter(job.model, broadcast=True)
    futures = [client.submit(run_item, *args_of(i, t, model), key=f"rj-item-{job.job_id[:12]}-{job.key(i, t)}",
                             pure=False, retries=2) for i, t in todo]
    for fut in as_completed(futures):
        accept(fut.result())
        fut.release()


def _run_local(job, todo, args_of, accept, kind, workers, tpw):
    from dask.callbacks import Callback
    from threadpoolctl import threadpool_limits

    if kind in ("synchronous", "sync", "single-threaded"):
        # one core: BLAS on one thread too (two OpenBLAS threads made a MNIST certify batch 1.25x slower in wall
        # time and 2.5x in CPU time than one)
        with threadpool_limits(1):
            for i, t in todo:
                accept(run_item(*args_of(i, t, job.model)))
        return
    if kind not in ("threads", "processes"):
        raise InputError(
            f"unknown scheduler {kind!r}; accepted: synchronous, threads, processes, local, local:N, tcp://host:port"
        )
    if kind == "processes" and not isinstance(job.model, (str, os.PathLike)):
        raise InputError("the processes scheduler needs the model as a store path")
    dsk = {f"item-{n}": (run_item, *args_of(i, t, job.model)) for n, (i, t) in enumerate(todo)}
    cb = Callback(posttask=lambda key, result, dsk, state, worker_id: accept(result))
    if kind == "threads":
        import dask.threaded

        n = tpw or os.cpu_count() or 1
        with threadpool_limits(1), cb:
            dask.threaded.get(dsk, list(dsk), num_workers=n)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import dask.multiprocessing

        from ..cluster import THREAD_ENV, _environ

        n = workers or os.cpu_count() or 1
        with _environ(THREAD_ENV):
            pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
        try:
            with cb:
                dask.multiprocessing.get(dsk, list(dsk), num_workers=n, pool=pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
