"""The engine's job: one Jacobian-bound computation as the engine holds it, in the client and on the workers.

The engine never decides *what* is computed.  It calls a :class:`recurjac_scale.jacobian.JacobianMethod` directly
(its documented interface: ``build_chain``, ``priors``, ``step_block``, ``finish``, ``cost``):

- :func:`prepare_job` (client): :func:`recurjac_scale.jacobian.prepare` (network, output fold, layer and derivative
  bounds, exactly as the in-memory :func:`~recurjac_scale.jacobian.jacobian_bounds`), then the method's chain, its
  sparse-kernel choice and its cost model (:class:`~recurjac_scale.jacobian.cost.ChainCost`): a
  :class:`JobContext`;
- :class:`WorkerSpec`: the picklable part shipped to workers, which rebuild (and cache, per process) the chain from
  it: from numpy weights of a small network, from the zarr model store's path, or streamed from the store
  (:mod:`recurjac_scale.engine.streaming`); :class:`BoundChain` pairs the built chain with its method.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..jacobian.chain import Chain, top_state
from ..jacobian.cost import ChainCost
from ..jacobian.methods import JACOBIAN_METHODS, JacobianMethod, get_jacobian_method
from ..jacobian.prepare import Job, prepare
from ..jacobian.sparse_policy import sparse_chain, with_sparse_levels
from ..errors import InputError
from ..network.model import Network

__all__ = ["BoundChain", "JobContext", "WorkerSpec", "prepare_job"]


# -- worker side ---------------------------------------------------------------------------------------------
_CHAINS: dict[str, "BoundChain"] = {}
_CHAINS_LOCK = threading.Lock()


@dataclass(frozen=True)
class WorkerSpec:
    """Picklable recipe of a job's chain, rebuilt once per worker process (:meth:`chain`).

    Attributes
    ----------
    key : str
        The job hash (cache key).
    method : JacobianMethod
        Shipped itself (its step function by reference), so a method registered by a module the workers can import
        runs with no registration step on the workers.
    network : Network or None
        In-memory network (numpy weights), shipped with the graph (once per worker under distributed).
    store_path : str or None
        Model store read by each worker process instead (weights never pass through the scheduler).
    outputs : ndarray (m, n_H) or None
        Output selection folded into the last layer after loading from the store.
    derivative_bounds : list of (ndarray, ndarray)
        ``(dl, du)`` per hidden layer, computed in the client from the pre-activation bounds (workers never
        recompute them, so every worker uses exactly the client's values, which the job hash covers).
    state_keys : tuple of str
    n_steps : int
    priors : tuple of tuple of int
        As :attr:`recurjac_scale.jacobian.cost.ChainCost.priors`.
    stream : bool
        Keep the weights in the store: every task reads the matrices it needs
        (:mod:`recurjac_scale.engine.streaming`) instead of the worker holding the network.
    sparse_levels : tuple of int
        Chain levels that run sparse x dense (``Chain.sparse_levels`` of the client's chain; empty: dense).  Each
        worker process builds their CSR copies once, with its chain (read from the store's CSR arrays when the
        weights are streamed).
    """

    key: str
    method: JacobianMethod
    network: Any
    store_path: str | None
    outputs: Any
    derivative_bounds: Any
    state_keys: tuple
    n_steps: int
    priors: tuple
    stream: bool = False
    sparse_levels: tuple = ()

    def prior_steps(self, t: int) -> tuple[int, ...]:
        return tuple(self.priors[t - 1])

    def chain(self) -> "BoundChain":
        """The chain of this job in this process (built on first use, then cached)."""
        c = _CHAINS.get(self.key)
        if c is not None:
            return c
        with _CHAINS_LOCK:
            c = _CHAINS.get(self.key)
            if c is None:
                c = BoundChain(self.method, self._build(self.method))
                if self.stream or len(_CHAINS) >= 2:  # keep at most two jobs' weights per process (streamed: one)
                    _CHAINS.clear()
                _CHAINS[self.key] = c
        return c

    def _build(self, method: JacobianMethod) -> Chain:
        if self.stream and self.store_path is not None:
            from .streaming import streamed_chain

            chain = streamed_chain(method, self.store_path, self.outputs, self.derivative_bounds)
            return with_sparse_levels(chain, self.sparse_levels)
        net = self.network
        if net is None:
            import dask

            from ..network.store_read import open_network

            # Read the store chunk by chunk in this thread: a compute() inside a task must never go back to the
            # cluster's scheduler (with one thread per worker that deadlocks).
            with dask.config.set(scheduler="synchronous"):
                net = open_network(self.store_path).materialize()
            if self.outputs is not None:
                net = net.with_outputs(self.outputs)
        return method.build_chain(net, self.derivative_bounds, sparse_levels=self.sparse_levels)


@dataclass(frozen=True)
class BoundChain:
    """A built chain with its method: the block functions a task calls."""

    method: JacobianMethod
    chain: Chain

    def step_block(self, t: int, rows: slice, cols: slice, priors: dict) -> dict:
        return self.method.step_block(self.chain, t, rows, cols, priors)

    def finish(self, final: dict, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        lower, upper = self.method.finish(self.chain, final)
        return lower[:, cols], upper[:, cols]

    def rounding_share(self, final, cols, lower, upper) -> float | None:
        """The rounding share of the result columns ``cols`` (:func:`recurjac_scale.jacobian.rounding.rounding_share`)
        from the method's allowance of the finished bounds."""
        from ..jacobian.rounding import rounding_share

        return rounding_share(lower, upper, self.method.finish_allowance(self.chain, final)[:, cols])

    def initial_state(self) -> dict:
        """State 0 (the exact top ``M_0``) for all rows."""
        return top_state(self.chain)


# -- client side ---------------------------------------------------------------------------------------------
@dataclass
class JobContext:
    """One job as prepared in the client (see :func:`prepare_job`).

    Attributes
    ----------
    job : Job
        The prepared region (:func:`recurjac_scale.jacobian.prepare`).
    method : JacobianMethod
    chain : Chain
        The method's chain (in-memory weights; with its sparse levels).
    cost : ChainCost
        The method's cost model on the chain (what the plan sizes with).
    store_path : str or None
        The model store the network was read from.
    stream : bool
        Set by the plan: tasks read the weights from the store (:mod:`recurjac_scale.engine.streaming`).
    sparse_levels : tuple of int
        ``chain.sparse_levels()``, shipped to the workers.
    name : str
        The method asked for (``method.name`` unless it runs through a stage).
    stage : object or None
        :attr:`JacobianMethod.stage` of a method whose chain ``method`` is the base
        (:mod:`recurjac_scale.engine.linear_stage`); ``None`` when the stage does not apply to the job.
    """

    job: Job
    method: JacobianMethod
    chain: Chain
    cost: ChainCost
    store_path: str | None = None
    stream: bool = False
    sparse_levels: tuple = ()
    name: str = ""
    stage: Any = None
    _hash_base: dict = field(default_factory=dict, repr=False)

    @property
    def network(self) -> Network:
        """The network with the output selection folded in."""
        return self.job.network

    @property
    def shape(self) -> ChainCost:
        """The cost model (:attr:`cost`; the name the plan and tests used before it moved to the method)."""
        return self.cost

    @property
    def layer_bound_method(self) -> str:
        return self.job.layer_bound_method

    @property
    def eps(self) -> float:
        return float(self.job.region.eps)

    @property
    def p(self) -> float:
        return float(self.job.region.p)

    @property
    def x0(self) -> np.ndarray:
        return np.asarray(self.job.region.x0, dtype=np.float64)

    @property
    def outputs(self) -> np.ndarray:
        return self.job.outputs

    @property
    def derivative_bounds(self) -> tuple:
        return self.job.derivative_bounds

    @property
    def unstable(self) -> tuple:
        return self.job.unstable

    @property
    def dead(self) -> tuple:
        return self.job.dead

    @property
    def widths(self) -> tuple:
        return tuple(self.network.widths)

    @property
    def n_inputs(self) -> int:
        return int(self.network.n_inputs)

    @property
    def n_outputs(self) -> int:
        return int(self.network.n_outputs)

    @property
    def rounding(self) -> str:
        return "see recurjac_scale.jacobian (per-method outward widening)"

    def job_id(self, row_block: int, col_block: int, stage_block: int | None = None) -> str:
        from .checkpoint import job_hash

        net = self.network
        arrays = [*net.weights, *net.biases, self.x0]
        params = dict(self._hash_base, row_block=int(row_block), col_block=int(col_block))
        if stage_block is not None:
            params["stage_block"] = int(stage_block)
        return job_hash(arrays, params)

    def worker_spec(self) -> WorkerSpec:
        key = self.job_id(0, 0)
        use_store = self.store_path is not None
        return WorkerSpec(
            key=key,
            method=self.method,
            network=None if use_store else self.network,
            store_path=self.store_path,
            outputs=self.outputs,
            derivative_bounds=list(self.derivative_bounds),
            state_keys=tuple(self.cost.state_keys),
            n_steps=self.cost.n_steps,
            priors=tuple(self.cost.priors),
            stream=bool(self.stream and use_store),
            sparse_levels=tuple(self.sparse_levels),
        )

    def describe(self) -> dict:
        d = self.network.describe()
        d["store"] = self.store_path
        return d


def _sha(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def prepare_job(network, x0, eps, p, method, layer_bounds=None, outputs=None, sparse_threshold="auto") -> JobContext:
    """Open the network, prepare the region (:func:`recurjac_scale.jacobian.prepare`: output fold, pre-activation
    and derivative bounds, in this process) and build the method's chain and cost model: everything a plan needs,
    nothing heavy.

    ``sparse_threshold`` (:func:`recurjac_scale.jacobian.sparse_policy.sparse_chain`): ``"auto"`` (default) runs the
    layers a model store holds as CSR sparse x dense, a number the levels with density below it, ``0`` / ``None``
    none; the choice is made here, once, and shipped to the workers as level numbers.
    """
    store_path = None
    if not isinstance(network, Network):
        from ..network.store_read import open_network

        store_path = str(Path(network).resolve())
        network = open_network(store_path)
    jm = get_jacobian_method(method)
    name, stage = jm.name, None
    if jm.run is not None:  # a whole-method runner (linear-jacobian): runs blockwise only through its stage
        if jm.stage is None:
            raise InputError(
                f"Jacobian method {jm.name!r} runs in memory only (recurjac-scale bounds, jacobian_bounds); the "
                "engine accepts: "
                + ", ".join(sorted(n for n, m in JACOBIAN_METHODS.items() if m.run is None or m.stage is not None))
            )
        stage = jm.stage
        jm = get_jacobian_method(stage.base)  # the chain run first (its states bound the gradients)
    job = prepare(network, x0, eps, p, outputs, layer_bounds)
    if stage is not None:
        from .linear_stage import stage_applies

        if not stage_applies(job):  # no hidden layer or unbounded region: the result is the base method's
            stage = None
    chain = sparse_chain(jm.build_chain(job.network, job.derivative_bounds), sparse_threshold, job.sparse_layers)
    sparse_levels = tuple(chain.sparse_levels())
    region, lb, db = job.region, job.layer_bounds, job.derivative_bounds
    ctx = JobContext(
        job=job, method=jm, chain=chain, cost=jm.cost(chain), store_path=store_path, sparse_levels=sparse_levels,
        name=name, stage=stage,
    )
    ctx._hash_base = {
        "method": name,
        "layer_bounds": job.layer_bound_method,
        "eps": repr(float(region.eps)),
        "p": repr(float(region.p)),
        "activations": [a.to_spec() for a in job.network.layer_activations],
        "domain": None if region.lower is None else _sha([region.lower, region.upper]),
        # the pre-activation bounds themselves: a changed layer-bound implementation is a different job
        "layer_bound_values": _sha([*lb.lower, *lb.upper]),
        "derivative_bounds": _sha([a for pair in db for a in pair]),
        "panel": int(chain.panel),
        "dtype": "float64",
        # sparse and dense kernels differ in the last bits: a checkpoint must not mix them
        **({"sparse_levels": list(sparse_levels)} if sparse_levels else {}),
    }
    return ctx
