"""Checkpoints of a blockwise Jacobian job: the per-block state store and an explicit record of finished blocks.

A checkpoint folder holds

- ``job.json``: the job's identity (a SHA-256 over the model weights, the input, eps, p, the methods, the output
  selection, the blocking and the dtype) and its description.  A folder bound to another job is never reused.
- ``state.zarr``: one zarr group per layer step ``t`` with the per-row state arrays (``lower``, ``upper``, ...) of
  shape ``(R, d_{t+1})``, chunks ``(row_block, col_block)`` (no sharding; one task writes exactly one chunk of each
  array, so no two tasks ever write the same chunk).  Fill value NaN: a block never written reads as NaN.
- ``done/step-TTT/rRRRRR-cCCCCC.json``: one small record per finished block, written atomically (temporary file,
  ``fsync``, ``os.replace``) *after* the block's chunks are written and flushed.  "Chunk exists" is never used as
  "done": zarr does not write chunks equal to the fill value.  The record holds the SHA-256 of each of the block's
  chunk files (``sha256``) and of its own content (``record_sha256``).

A rerun of the same job reads the records and skips every finished block whose record and chunk files still match
their checksums (:meth:`Checkpoint.verified`); a block with a damaged or hand-edited record or chunk is recomputed,
never trusted.  The file names a record holds are resolved inside the checkpoint folder
(:func:`recurjac_scale.paths.resolve_inside`): an absolute name, ``..`` or a symlink leading out makes the record
damaged, and the file is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError, StoreError
from ..paths import resolve_inside, write_atomic

__all__ = ["Checkpoint", "job_hash", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout; part of the job hash."""



_ARRAYS: dict = {}
_ARRAYS_LOCK = threading.Lock()


def open_state_array(path: str, job_id: str):
    """Open (and cache per process) a zarr array of the state / result stores.  The cache key includes the job:
    a folder reused by another job (``--overwrite``) has other shapes and chunks."""
    key = (path, job_id)
    a = _ARRAYS.get(key)
    if a is None:
        import zarr

        with _ARRAYS_LOCK:
            a = _ARRAYS.get(key)
            if a is None:
                a = zarr.open_array(path, mode="r+")
                if len(_ARRAYS) > 256:
                    _ARRAYS.clear()
                _ARRAYS[key] = a
    return a


def state_array_path(state: str, t: int, key: str) -> str:
    """Path of the state array ``key`` (``"lower"`` / ``"upper"``) of step ``t`` inside a run's state folder."""
    return os.path.join(state, f"step-{t:03d}", key)

def _hash_array(h, a) -> None:
    """Feed an array (numpy or dask/zarr-backed) to a hash in row panels, with its shape and dtype."""
    if hasattr(a, "compute") and hasattr(a, "chunks") and not isinstance(a, np.ndarray):
        h.update(repr((tuple(a.shape), "float64")).encode())
        step = max(1, int(2**24 // max(1, 8 * (a.shape[1] if a.ndim == 2 else 1))))
        for i in range(0, a.shape[0], step):
            h.update(np.ascontiguousarray(np.asarray(a[i : i + step].compute(), dtype=np.float64)).tobytes())
        return
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
    h.update(repr((a.shape, "float64")).encode())
    h.update(a.tobytes())


def job_hash(arrays: Iterable, params: dict) -> str:
    """SHA-256 (hex) identifying a job: the contents of ``arrays`` (weights, biases, input, output selection ...)
    and the JSON-able ``params`` (eps, p, methods, blocking, dtype ...)."""
    h = hashlib.sha256()
    h.update(f"recurjac-scale-checkpoint-{CHECKPOINT_FORMAT}".encode())
    for a in arrays:
        if a is None:
            h.update(b"none")
        else:
            _hash_array(h, a)
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _atomic_write_json(path: Path, obj: dict, fsync: bool = True) -> None:
    write_atomic(path, lambda f: json.dump(obj, f), fsync=fsync)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for buf in iter(lambda: f.read(1 << 20), b""):
            h.update(buf)
    return h.hexdigest()


def _files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(Path(r) / n for r, _d, fs in os.walk(path) for n in fs) if path.exists() else []


def _record_digest(rec: dict) -> str:
    body = {k: v for k, v in rec.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (the chunk files of one block), so the record never outlives its data."""
    if not path.exists():
        return
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder bound to one job (see the module docstring).

    Attributes
    ----------
    path : Path
        The folder.
    job_id : str
        The job hash it is bound to.
    """

    path: Path
    job_id: str

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path, job_id: str, description: dict | None = None, *, reset: bool = False) -> "Checkpoint":
        """Open (or create) the checkpoint folder ``path`` for job ``job_id``.

        An existing folder bound to a different job raises :class:`StoreError` (unless ``reset``, which empties
        it).  A folder that exists but is not a checkpoint is never touched.
        """
        path = Path(path)
        meta = path / "job.json"
        if path.exists() and any(path.iterdir()):
            if not meta.exists():
                raise StoreError(
                    f"checkpoint folder {str(path)!r} exists, is not empty and is not a recurjac-scale checkpoint; "
                    "give an empty or new folder"
                )
            try:
                old = json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"checkpoint {str(path)!r}: unreadable job.json ({exc})") from None
            if old.get("job_id") != job_id:
                if not reset:
                    raise StoreError(
                        f"checkpoint folder {str(path)!r} belongs to another job (model, input, eps, norm, method or "
                        f"blocking differ: {old.get('job_id', '?')[:12]} != {job_id[:12]}); give another folder, "
                        "or pass --overwrite to discard it"
                    )
                shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            _atomic_write_json(
                meta,
                {"format": CHECKPOINT_FORMAT, "job_id": job_id, "created": time.time(), "job": description or {}},
            )
        (path / "done").mkdir(exist_ok=True)
        return cls(path=path, job_id=job_id)

    @property
    def state_path(self) -> Path:
        """The zarr group of the per-step state arrays."""
        return self.path / "state.zarr"

    # -- records ---------------------------------------------------------------------------------------------
    def _record_path(self, step: int, rb: int, cb: int) -> Path:
        return self.path / "done" / f"step-{step:03d}" / f"r{rb:06d}-c{cb:06d}.json"

    def record(
        self, step: int, rb: int, cb: int, info: dict, data_paths: Iterable[Path] = (), *, fsync: bool = True
    ) -> None:
        """Mark block ``(rb, cb)`` of layer step ``step`` finished: flush its data files, then write the record
        atomically.  ``info`` (timings, worker) is stored in the record.

        The data was written (files closed) before this call, so the record never outlives its data when the
        *process* dies; ``fsync`` (default) also flushes data and record to the disk first, so that holds for a
        crash of the machine too (about 5 ms per file on this machine's disk)."""
        data_paths = [Path(p) for p in data_paths]
        if fsync:
            for p in data_paths:
                _fsync_tree(p)
        sums = {}
        for p in data_paths:
            for f in _files(p):
                sums[os.path.relpath(f, self.path)] = _sha256_file(f)
        rec = self._record_path(step, rb, cb)
        rec.parent.mkdir(parents=True, exist_ok=True)
        body = {"job_id": self.job_id, "step": step, "rb": rb, "cb": cb, **info, "sha256": sums}
        body["record_sha256"] = _record_digest(body)
        _atomic_write_json(rec, body, fsync=fsync)

    def is_done(self, step: int, rb: int, cb: int) -> bool:
        return self.read_record(step, rb, cb) is not None

    def read_record(self, step: int, rb: int, cb: int) -> dict | None:
        """The record of a finished block, or ``None`` (missing, torn or foreign records count as not done)."""
        try:
            r = json.loads(self._record_path(step, rb, cb).read_text())
        except (OSError, ValueError):
            return None
        return r if isinstance(r, dict) and r.get("job_id") == self.job_id else None

    def finished(self) -> dict[tuple[int, int, int], dict]:
        """All finished blocks: ``{(step, rb, cb): record}`` (unreadable or foreign records are ignored, so their
        blocks are recomputed)."""
        out: dict[tuple[int, int, int], dict] = {}
        done = self.path / "done"
        if not done.exists():
            return out
        for d in sorted(done.iterdir()):
            if not d.is_dir() or not d.name.startswith("step-"):
                continue
            for f in d.glob("r*-c*.json"):
                try:
                    r = json.loads(f.read_text())
                    if not isinstance(r, dict) or r.get("job_id") != self.job_id:
                        continue
                    key = (int(r["step"]), int(r["rb"]), int(r["cb"]))
                except (OSError, KeyError, TypeError, ValueError):  # torn or edited: its block is recomputed
                    continue
                if f != self._record_path(*key):  # a record under another block's name is not that block's
                    continue
                out[key] = r
        return out

    def check_record(self, rec: dict) -> str | None:
        """Why a record cannot be trusted (its own checksum, or a chunk file's, does not match; a chunk file is
        missing), or ``None`` when it and its data are intact."""
        if rec.get("record_sha256") != _record_digest(rec):
            return "the record does not match its checksum"
        sums = rec.get("sha256")
        if not isinstance(sums, dict) or not sums:
            return "the record holds no data checksums"
        for rel, digest in sums.items():
            try:
                f = resolve_inside(self.path, rel)
            except InputError as exc:
                return f"the record names a file outside the checkpoint: {exc}"
            try:
                if _sha256_file(f) != digest:
                    return f"{rel} does not match its checksum"
            except OSError as exc:
                return f"{rel} cannot be read ({exc.strerror or exc})"
        return None

    def verified(self, log=None) -> dict[tuple[int, int, int], dict]:
        """:meth:`finished`, keeping only blocks whose record and chunk files match their SHA-256 checksums.  The
        record of a damaged block is deleted (so it is recomputed), and ``log`` (if given) is told which."""
        out = {}
        for key, rec in self.finished().items():
            why = self.check_record(rec)
            if why is None:
                out[key] = rec
                continue
            if log is not None:
                log(f"checkpoint block (step {key[0]}, rows {key[1]}, columns {key[2]}) is damaged ({why}); "
                    "recomputing it")
            self._record_path(*key).unlink(missing_ok=True)
        return out

    def remove(self) -> None:
        """Delete the checkpoint folder."""
        shutil.rmtree(self.path, ignore_errors=True)
