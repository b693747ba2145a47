"""The engine's result: :class:`EngineResult` in memory, and the zarr result store that
:func:`recurjac_scale.engine.run.run_plan` (``recurjac-scale run``) writes and :func:`read_result_store` reads,
never trusting it blindly.

The store's attributes hold ``format`` (``recurjac-scale-jacobian-bounds``), ``format_version``, ``complete``
(true only once every block was computed) and ``sha256``: the SHA-256 of the C-order float64 bytes of ``lower``
and ``upper``.  The store is assembled under a temporary name (:func:`create_result_store`) and only renamed into
place once complete (:func:`seal_result_store`).  :func:`read_result_store` checks all of them: a store edited by
hand or damaged on disk raises :class:`~recurjac_scale.errors.IntegrityError` (rerun the job with ``--overwrite``
to recompute it), a partial one :class:`~recurjac_scale.errors.IncompleteRunError`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._json import json_float, json_safe
from ..errors import IncompleteRunError, IntegrityError, StoreError

__all__ = [
    "EngineResult",
    "RESULT_FORMAT",
    "RESULT_FORMAT_VERSION",
    "array_sha256",
    "create_result_store",
    "seal_result_store",
    "read_result_store",
]

RESULT_FORMAT = "recurjac-scale-jacobian-bounds"
RESULT_FORMAT_VERSION = 1


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 (hex) of an array's C-order float64 bytes, with its shape."""
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class EngineResult:
    """Jacobian bounds computed by the engine.

    Attributes
    ----------
    lower, upper : ndarray, shape (m, n_0), float64
        ``lower <= df/dx (x) <= upper`` elementwise for every x in ``B_p[x0, eps] ∩ D`` (the method's guarantee;
        the engine only decides where the block functions run, never what they compute).
    method, layer_bound_method : str
    eps, p : float
    job_id : str
    blocks_total : int
        Blocks of all layer steps.
    blocks_reused : int
        Blocks found finished in the checkpoint and not recomputed.
    blocks_computed : int
    seconds : float
        Wall time of the run (layer bounds excluded; see ``plan.layer_bounds_seconds``).
    step_seconds : dict
        Per layer step, the summed compute time of its tasks (seconds of task time, not wall time).
    task_times : dict
        ``(t, rb, cb) -> seconds`` of every block computed in this run.
    lipschitz : float or None
        Local Lipschitz constant from the bounds (Proposition 2), when :mod:`recurjac_scale.lipschitz` is present.
    output : str or None
        The zarr result store written, if any.
    executor : dict
        Scheduler, workers, threads, dashboard link.
    rounding_share : float or None
        The largest share of a bound's width that certified rounding may cost
        (:func:`recurjac_scale.jacobian.rounding.rounding_share`); ``None`` when the method does not state it.
    """

    lower: np.ndarray
    upper: np.ndarray
    method: str
    layer_bound_method: str
    eps: float
    p: float
    job_id: str
    blocks_total: int
    blocks_reused: int
    blocks_computed: int
    seconds: float
    step_seconds: dict
    task_times: dict = field(repr=False)
    lipschitz: float | None
    output: str | None
    executor: dict
    rounding_share: float | None = None

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "layer_bound_method": self.layer_bound_method,
            "eps": json_float(self.eps),
            "p": json_float(self.p),
            "shape": list(self.lower.shape),
            "job_id": self.job_id,
            "blocks_total": self.blocks_total,
            "blocks_reused": self.blocks_reused,
            "blocks_computed": self.blocks_computed,
            "seconds": self.seconds,
            "step_seconds": {str(k): v for k, v in self.step_seconds.items()},
            "lipschitz": self.lipschitz,
            "output": self.output,
            "executor": self.executor,
            "rounding_share": self.rounding_share,
        }



def create_result_store(path: Path, plan, m: int, n0: int) -> None:
    """Create the (temporary) result store of ``plan``: arrays ``lower`` and ``upper`` of shape ``(m, n0)``, float64,
    NaN-filled, one chunk per column block of the plan; an existing folder at ``path`` is removed first."""
    import zarr

    if path.exists():
        shutil.rmtree(path)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    for k in ("lower", "upper"):
        g.create_array(
            k,
            shape=(m, n0),
            chunks=(m, min(plan.col_block, n0)),
            dtype="float64",
            fill_value=np.nan,
            config={"write_empty_chunks": True},
        )



def seal_result_store(group, tmp: Path, output: Path, result: EngineResult, plan, ctx, lower, upper) -> None:
    """Mark the finished store ``group`` (at ``tmp``) complete and rename it to ``output``.

    The attributes record the format, ``result.to_dict()``, the plan, the network description, the rounding
    settings and the SHA-256 of ``lower`` and ``upper`` (shape ``(m, n_0)``, float64, as written); a store already
    at ``output`` is replaced (the caller checked ``overwrite`` before the run).
    """
    group.attrs.update(
        json_safe(
            {
                "format": RESULT_FORMAT,
                "format_version": 1,
                "result": result.to_dict(),
                "plan": plan.to_dict(),
                "network": ctx.describe(),
                "rounding": ctx.rounding,
                "complete": True,
                "sha256": {"lower": array_sha256(lower), "upper": array_sha256(upper)},
            }
        )
    )
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)


def read_result_store(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(lower, upper, attributes)`` of a result store, after checking its format, completeness and checksums.

    Returns
    -------
    lower, upper : ndarray, shape (m, n_0), float64
        ``lower <= d(C f)/dx (x) <= upper`` over the job's region (as certified when the store was written).
    attributes : dict

    Raises
    ------
    StoreError
        Not a result store, or a newer format version.
    IncompleteRunError
        The store is not marked complete.
    IntegrityError
        ``lower`` or ``upper`` does not match its SHA-256 checksum, or the store holds none.
    """
    import zarr

    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs)
    except Exception as exc:  # noqa: BLE001 - any unreadable store is reported the same way
        raise StoreError(f"{str(path)!r}: not a readable result store ({type(exc).__name__}: {exc})") from None
    if attrs.get("format") != RESULT_FORMAT:
        raise StoreError(f"{str(path)!r}: not a recurjac-scale result store (format {attrs.get('format')!r})")
    if int(attrs.get("format_version", 0)) > RESULT_FORMAT_VERSION:
        raise StoreError(
            f"{str(path)!r}: result format version {attrs.get('format_version')} is newer than the version "
            f"{RESULT_FORMAT_VERSION} this recurjac-scale reads; upgrade recurjac-scale"
        )
    if attrs.get("complete") is not True:
        raise IncompleteRunError(f"{str(path)!r}: the result store is not marked complete; rerun the job")
    sums = attrs.get("sha256")
    if not isinstance(sums, dict):
        raise IntegrityError(f"{str(path)!r}: the result store holds no checksums; recompute it with --overwrite")
    out = []
    for k in ("lower", "upper"):
        try:
            a = np.asarray(g[k][...], dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            raise IntegrityError(f"{str(path)!r}: array {k!r} cannot be read ({type(exc).__name__}: {exc})") from None
        if array_sha256(a) != sums.get(k):
            raise IntegrityError(
                f"{str(path)!r}: array {k!r} does not match its SHA-256 checksum (edited or damaged); recompute "
                "it with --overwrite"
            )
        out.append(a)
    return out[0], out[1], attrs
