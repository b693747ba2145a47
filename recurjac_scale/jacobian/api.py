"""Python entry point: :func:`jacobian_bounds`."""

from __future__ import annotations

import math
import time

import numpy as np

from .. import kernels
from ..errors import InputError
from ..layer_bounds.base import LayerBounds
from ..network.model import Network
from .chain import DEFAULT_PANEL
from .derivative_bounds import derivative_bounds_for
from .driver import run_chain
from .methods import get_jacobian_method
from .prepare import default_layer_bound_method, output_matrix, prepare
from .result import JacobianBounds
from .sparse_policy import sparse_chain

__all__ = ["jacobian_bounds", "output_matrix", "default_layer_bound_method", "derivative_bounds_for"]

def jacobian_bounds(
    network: Network,
    x0,
    eps: float,
    p=math.inf,
    method: str = "recurjac-b",
    layer_bounds: str | LayerBounds | None = None,
    outputs=None,
    dtype=np.float64,
    row_block: int | None = None,
    col_block: int | None = None,
    *,
    panel: int = DEFAULT_PANEL,
    keep_states: bool = True,
    sparse_threshold: float | str | None = None,
) -> JacobianBounds:
    """Certified element-wise bounds of the Jacobian of ``C f`` over ``B_p[x0, eps] ∩ D`` (Zhang et al. 2019).

    Parameters
    ----------
    network : Network
        Any registered activations (Assumption 2); an output activation is handled as one more hidden layer
        (``Network.with_outputs``).
    x0 : array_like, shape (n_0,)
        Centre of the region (raw input units, inside the domain if one is declared).
    eps : float
        Radius in ``[0, inf]``.  ``inf`` = global bounds: over the domain when the model has one, else with the
        activations' global derivative ranges.
    p : {1, 2, inf}
        Input norm.
    method : str
        ``recurjac-b`` (default), ``recurjac-f0``, ``recurjac-f1``, ``fastlip`` or ``linear-jacobian`` (linear
        bound propagation through the gradient graph, :mod:`recurjac_scale.jacobian.linear`)
        (:data:`JACOBIAN_METHODS`).
    layer_bounds : str, LayerBounds or None
        Pre-activation bound method (``crown``, ``fastlin``, ``ibp``; ``None``: ``crown`` when registered, else
        the best registered), or precomputed :class:`LayerBounds` of the network with the outputs folded in (only
        the hidden layers are used; the caller vouches that they hold over the region).
    outputs : None, "all", int, (c, j) or array (m, n_H)
        Output selection, see :func:`output_matrix`.
    dtype : float64 (default) or float32
        Arithmetic type; float32 is a speed option (its rounding is accounted for too).
    row_block, col_block : int, optional
        Block sizes of the in-memory driver; results are bitwise independent of them.
    panel : int
        GEMM panel width (results depend on it bitwise, not in soundness).
    keep_states : bool
        Keep the chain and the per-step states on the result (for Algorithm 2 and the like).
    sparse_threshold : float or "auto", optional
        Opt-in sparse x dense kernels (scipy.sparse CSR) for chain matrices with weight density below it (e.g.
        0.15, for pruned networks), or ``"auto"``: for the layers a model store holds as CSR (what the CLI and the
        engine do by default); ``None`` (default) or ``0``: dense.  Bounds equal the dense kernels' to about
        1e-15 relative (the summation order differs) and are certified the same way.

    Returns
    -------
    JacobianBounds
        ``lower``, ``upper`` of shape ``(m, n_0)`` with ``lower <= C J(x) <= upper`` for every ``x`` of the region,
        for the exact real-number Jacobian (at activation kinks: every one-sided derivative).
    """
    jm = get_jacobian_method(method)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise InputError(f"dtype {dtype} is not supported; accepted: float64, float32")
    job = prepare(network, x0, eps, p, outputs, layer_bounds)
    db = job.derivative_bounds
    compile_s = kernels.ensure_compiled(dtype)
    t1 = time.perf_counter()
    timings, extra = {}, {}
    if jm.run is not None:  # a whole-method runner (linear-jacobian)
        lower, upper, chain, states, info = jm.run(
            job.network, job.region, job.layer_bounds, db, dtype=dtype, panel=panel,
            sparse_threshold=sparse_threshold, stored_sparse=job.sparse_layers,
        )
        timings = {k: float(v) for k, v in info.items() if k.endswith("_s")}
        if "rounding" in info:
            extra["rounding"] = info["rounding"]
        allowance = None
        if chain is not None and states:
            from .linear_method import runner_allowance

            allowance = runner_allowance(chain, states[-1], lower, upper, info.get("allowance", 0.0))
    else:
        chain = jm.build_chain(job.network, db, dtype=dtype, panel=panel)
        chain = sparse_chain(chain, sparse_threshold, job.sparse_layers)
        lower, upper, states = run_chain(jm, chain, row_block=row_block, col_block=col_block, keep_states=keep_states)
        allowance = jm.finish_allowance(chain, states[-1])
    t_jac = time.perf_counter() - t1
    return JacobianBounds(
        lower=lower,
        upper=upper,
        method=jm.name,
        layer_bound_method=job.layer_bound_method,
        p=job.region.p,
        eps=job.region.eps,
        x0=job.region.x0,
        outputs=job.outputs,
        layer_bounds=job.layer_bounds,
        unstable=job.unstable,
        timings={"layer_bounds": job.layer_bounds_seconds, "jacobian": t_jac, "compile": compile_s, **timings},
        dtype=dtype.name,
        allowance=allowance,
        chain=chain if keep_states else None,
        states=states if keep_states else None,
        **extra,
    )

