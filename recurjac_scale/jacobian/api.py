"""Python entry point: :func:`jacobian_bounds`."""

from __future__ import annotations

import math
import time

import numpy as np

from .. import kernels
from ..errors import InputError, ShapeMismatchError
from ..layer_bounds.base import LAYER_BOUND_METHODS, LayerBounds, Region, layer_bounds as compute_layer_bounds
from ..network.model import Network
from .chain import DEFAULT_PANEL, derivative_bounds_for, sparse_chain, stored_sparse_layers
from .driver import run_chain
from .methods import get_jacobian_method
from .result import JacobianBounds

__all__ = ["jacobian_bounds", "output_matrix", "default_layer_bound_method", "derivative_bounds_for"]

_PREFERRED = ("crown", "fastlin", "ibp")


def default_layer_bound_method() -> str:
    """``crown`` when registered, else the best registered of ``fastlin``, ``ibp``."""
    for name in _PREFERRED:
        if name in LAYER_BOUND_METHODS:
            return name
    raise InputError("no layer-bound method is registered")  # pragma: no cover


def output_matrix(outputs, n_outputs: int) -> np.ndarray:
    """The output selection ``C`` of shape ``(m, n_H)``.

    Parameters
    ----------
    outputs : None, "all", int, (c, j), "K", "C,J" or array of shape (m, n_H)
        ``None`` / ``"all"``: every output (``C = I``); ``k``: output ``k``; ``(c, j)``: the margin
        ``f_c - f_j`` (``j = None``: output ``c``); a matrix: its rows.
    n_outputs : int
        ``n_H``.
    """
    n = int(n_outputs)

    def idx(v) -> int:
        try:
            k = int(v)
        except (TypeError, ValueError):
            raise InputError(f"output index {v!r} is not an integer; accepted: 0..{n - 1}") from None
        if isinstance(v, float) and v != k:
            raise InputError(f"output index {v!r} is not an integer")
        if not 0 <= k < n:
            raise InputError(f"output index {k} out of range; accepted: 0..{n - 1}")
        return k

    if outputs is None:
        return np.eye(n)
    if isinstance(outputs, str):
        s = outputs.strip().lower()
        if s == "all":
            return np.eye(n)
        parts = [p.strip() for p in s.split(",")]
        if len(parts) == 1:
            outputs = parts[0]
        elif len(parts) == 2:
            outputs = (parts[0], parts[1])
        else:
            raise InputError(f"outputs={outputs!r}; accepted: 'all', 'K' or 'C,J'")
    if isinstance(outputs, (int, np.integer, str)):
        C = np.zeros((1, n))
        C[0, idx(outputs)] = 1.0
        return C
    if isinstance(outputs, tuple) and len(outputs) == 2 and not isinstance(outputs[0], (list, tuple, np.ndarray)):
        c = idx(outputs[0])
        C = np.zeros((1, n))
        C[0, c] = 1.0
        if outputs[1] is not None:
            j = idx(outputs[1])
            if j == c:
                raise InputError(f"margin f_c - f_j needs c != j (got c = j = {c})")
            C[0, j] = -1.0
        return C
    C = np.asarray(outputs, dtype=np.float64)
    if C.ndim == 1:
        C = C[None, :]
    if C.ndim != 2 or C.shape[1] != n or C.shape[0] == 0:
        raise ShapeMismatchError(f"output matrix of shape {C.shape}; need (m, {n}) with m >= 1")
    if not np.isfinite(C).all():
        raise InputError("output matrix contains NaN or infinite values")
    return C


def _global_layer_bounds(network: Network, region: Region) -> LayerBounds:
    lowers = tuple(np.full(n, -np.inf) for n in network.widths[1:])
    uppers = tuple(np.full(n, np.inf) for n in network.widths[1:])
    unstable = tuple(
        int(np.count_nonzero(np.less(*a.derivative_bounds(l, u)))) for a, l, u in zip(network.layer_activations, lowers, uppers)
    )
    return LayerBounds(lower=lowers, upper=uppers, method="global", region=region, unstable=unstable)


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
        bound propagation through the gradient graph, :mod:`recurjac_scale.jacobian.linear`; in memory only)
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
    net = network.materialize() if network.is_lazy else network
    region = Region.of(net, x0, eps, p)
    C = output_matrix(outputs, net.n_outputs)
    netC = net.with_outputs(C)

    t0 = time.perf_counter()
    if isinstance(layer_bounds, LayerBounds):
        lb = layer_bounds
        lb_name = lb.method
    elif math.isinf(region.eps) and region.lower is None:
        lb = _global_layer_bounds(netC, region)
        lb_name = "global"
    else:
        lb_name = default_layer_bound_method() if layer_bounds is None else str(layer_bounds).strip().lower()
        lb = compute_layer_bounds(netC, region.x0, region.eps, region.p, method=lb_name)
    t_lb = time.perf_counter() - t0

    db = derivative_bounds_for(netC, lb)
    compile_s = kernels.ensure_compiled(dtype)
    t1 = time.perf_counter()
    timings, extra = {}, {}
    if jm.run is not None:  # a whole-method runner (linear-jacobian), in memory
        lower, upper, chain, states, info = jm.run(
            netC, region, lb, db, dtype=dtype, panel=panel, sparse_threshold=sparse_threshold,
            stored_sparse=stored_sparse_layers(network),
        )
        timings = {k: float(v) for k, v in info.items() if k.endswith("_s")}
        if "rounding" in info:
            extra["rounding"] = info["rounding"]
    else:
        chain = jm.build_chain(netC, db, dtype=dtype, panel=panel)
        chain = sparse_chain(chain, sparse_threshold, stored_sparse_layers(network))
        lower, upper, states = run_chain(jm, chain, row_block=row_block, col_block=col_block, keep_states=keep_states)
    t_jac = time.perf_counter() - t1
    unstable = tuple(int(np.count_nonzero(dl < du)) for dl, du in db)
    return JacobianBounds(
        lower=lower,
        upper=upper,
        method=jm.name,
        layer_bound_method=lb_name,
        p=region.p,
        eps=region.eps,
        x0=region.x0,
        outputs=C,
        layer_bounds=lb,
        unstable=unstable,
        timings={"layer_bounds": t_lb, "jacobian": t_jac, "compile": compile_s, **timings},
        dtype=dtype.name,
        chain=chain if keep_states else None,
        states=states if keep_states else None,
        **extra,
    )
