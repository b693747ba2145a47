"""The chain: the matrix product whose element-wise bounds every Jacobian method computes, and the block interface.

A chain is the product

    P = M_0 Σ_1 M_1 Σ_2 M_2 ... Σ_T M_T

where ``M_0`` (the *top*, shape ``(R, d_1)``) is known exactly and its ``R`` rows are the independent rows of the
recursion, ``M_t`` has shape ``(d_t, d_{t+1})`` and ``Σ_t = diag(σ')`` with certified derivative bounds
``dl_t <= σ' <= du_t`` (shape ``(d_t,)``).  ``P_t := M_0 Σ_1 M_1 ... Σ_t M_t`` has shape ``(R, d_{t+1})``;
``P_0 = M_0``.

- Backward (``recurjac-b``, ``fastlip``): ``M_0 = W(H)`` (the output layer with the output selection ``C``
  folded in: ``m`` rows), ``M_1 = W(H-1)``, ..., ``M_T = W(1)``; ``Σ_t`` is hidden layer ``H - t``.  ``P_T`` is
  the Jacobian ``(m, n_0)``; ``P_t`` is ``∂f/∂h(H-1-t)``.
- Forward F0 (``recurjac-f0``): ``M_0 = W(1)ᵀ`` (rows = the ``n_0`` inputs), ``M_1 = W(2)ᵀ``, ...,
  ``M_T = W(H)ᵀ``; ``Σ_t`` is hidden layer ``t``.  ``P_Tᵀ`` is the Jacobian; ``P_tᵀ`` is ``∂z(t+1)/∂x``.
- Forward F1 (``recurjac-f1``): the F0 chain of the sub-network that starts at ``h(1)`` (rows = the ``n_1``
  neurons of layer 1, ``P_Tᵀ = ∂f/∂h(1)``), then one interval product with ``Σ(1) W(1)``
  (:attr:`Chain.finish_mat`, :attr:`Chain.finish_dl`, :attr:`Chain.finish_du`).

Block interface (what the scale engine runs)
--------------------------------------------
Per-row *state* of step ``t`` (``s = 0..T``) is a dict of arrays of shape ``(R, d_{t+1})``: ``"lower"``,
``"upper"`` (certified bounds of ``P_t``) and ``"mag"`` (the magnitude chain
``|M_0| D(du_1) |M_1| ... D(du_t) |M_t|`` that bounds every partial sum of the recursion, used for the outward
rounding allowance).  State 0 is exact: :func:`top_state`.  A method (registry
:data:`recurjac_scale.jacobian.JACOBIAN_METHODS`) is run as::

    chain = method.build_chain(network, layer_bounds)                       # or derivative bounds
    state[0][rows] = top_state(chain, rows)                                   # for every row block
    for t in 1..chain.n_steps:
        for rows in row blocks, cols in column blocks of range(d_{t+1}):      # independent tasks
            V = np.asarray(chain.mats[t - 1][:, cols])                        # (d_t, c) plain numpy
            priors = [state[s][rows] if s in method.priors(t) else None for s in range(t)]
            state[t][rows, cols] = method.step(chain, t, V, priors)           # dict of (R_blk, c) arrays
    lower, upper = method.finish(chain, state[chain.n_steps])                 # (m, n_0), in memory

A step task touches only ``chain.mats[0 : t - 1]`` (``M_1 .. M_{t-1}``, all columns), ``chain.dl[:t]``,
``chain.du[:t]``, its column panel ``V`` of ``M_t`` and the priors of its rows; never the top matrix (state 0 holds
its rows).  ``V`` may also be per row, shape ``(R_blk, d_t, c)`` (Algorithm 2 pushes ``V_j = W(1) s_j``).
Results do not depend on how rows and columns are blocked: bitwise, because every GEMM runs on fixed-shape
panels (:attr:`Chain.panel` columns, zero-padded; :attr:`Chain.row_tile` x panel tiles where both operands vary with the
block), every numba reduction sums in a fixed order per row, and every choice between kernel variants depends on
the chain or on the row alone.  ``finish`` needs the whole last state (``R x m``; small).

The in-memory driver :func:`recurjac_scale.jacobian.driver.run_chain` is exactly this loop (block sizes from
:func:`recurjac_scale.jacobian.driver.auto_blocks`: Fast-Lip one block, RecurJac bounded by the operand memory).

Rounding
--------
Each step widens its bounds outward by ``gamma(N_t) * mag_t`` (+ tiny), ``N_t = 3 Σ_{s<=t} d_s + 4 t + 4``
(:func:`widening`): every value computed by step ``t`` is a sum of products whose absolute sum is dominated by
``mag_t`` (induction over the levels: Term I coefficients satisfy ``|Um| <= mag_{t-1}`` and the merged weights
``|Ŵ| <= |M| D(du) |V|``), with at most ``N_t`` roundings on any path (one GEMM of length ``<= d_s`` per level,
the sequential Term I / top sum of at most ``Σ d_s`` terms, with sharing across rows one more product of length
``r_s <= Σ d_s`` per path, and a few scalings and additions per level); Higham (Eq. 3.5, and
its extension to products) bounds the error by ``γ_{N_t} mag_t``.  :func:`recurjac_scale._fp.gamma` returns twice
``γ_N``; that factor 2 and the ``(1 + gamma)`` factor cover the rounding of ``mag`` itself and the (widened,
hence slightly larger than ``mag``) prior bounds used as Term I coefficients.  float32 adds ``4 t + 4`` to ``N_t``
for the rounding of the weights to float32 (derivative bounds are rounded outward).  Fast-Lip and the F1 finish
use their local summation length instead (their inputs are certified floats).  Sparse x dense products of pruned
levels (:meth:`Chain.with_sparse`) sum over a row's stored entries only: a summation length <= the dense one, so
the same allowances hold.  Products that underflow are not covered by a relative bound once later factors amplify
them: each recursion step also adds the absolute :func:`underflow_allowance` (negligible at ordinary scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

try:  # scipy is a dependency of the package; the guard keeps the dense path free of it
    import scipy.sparse as _sp
except ImportError:  # pragma: no cover
    _sp = None

from .._fp import cast_weights, gamma, underflow_unit
from ..errors import InputError, ShapeMismatchError
from ..layer_bounds.base import apply_phases

__all__ = [
    "Chain",
    "derivative_bounds_for",
    "top_state",
    "widening",
    "underflow_allowance",
    "widen_outward",
    "sign_slack",
    "panel_matmul",
    "tile_matmul",
    "level_is_sparse",
    "panel_csr_t",
    "panel_products",
    "live_neurons",
    "unstable_neurons",
    "finish_products",
    "sparse_chain",
    "stored_sparse_layers",
    "STATE_KEYS",
    "DEFAULT_PANEL",
    "KERNEL_SPARSE_THRESHOLD",
]

KERNEL_SPARSE_THRESHOLD = 0.15
"""Density below which :meth:`Chain.with_sparse` (default) keeps a CSR copy of a chain matrix for the RecurJac
level products (a pruned layer; sparse x dense in ``scipy.sparse`` beats BLAS only well below 30% density)."""

STATE_KEYS = ("lower", "upper", "mag")
"""Keys of the per-row state every step returns (each ``(R_blk, c)``)."""

DEFAULT_PANEL = 128
"""GEMM panel width (columns per BLAS call).  Results depend on it, bitwise, so it is a property of the chain, not
of the blocking."""

ROW_TILE = 16
"""Smallest row tile of :func:`tile_matmul` (products whose left operand is a block of rows)."""

ROW_TILE_MAX = 128
"""Largest row tile: a chain with many rows (F0: the inputs) runs its row-block products on 128-row tiles, which
BLAS runs at about twice the rate of 16-row tiles (one thread, 3072-deep products)."""


def row_tile_for(n_rows: int) -> int:
    """The row tile of a chain with ``n_rows`` rows (:attr:`Chain.row_tile`): the smallest power of two ``>= n_rows``
    between :data:`ROW_TILE` and :data:`ROW_TILE_MAX`.  It depends on the chain alone, never on the blocking, so
    results stay bitwise blocking-invariant; a chain with few rows (RecurJac-B: the outputs) pads little."""
    n = max(1, int(n_rows))
    return int(min(ROW_TILE_MAX, max(ROW_TILE, 1 << (n - 1).bit_length())))


def _np(a, dtype=None) -> np.ndarray:
    if not isinstance(a, np.ndarray) and hasattr(a, "compute"):
        a = a.compute()
    return np.asarray(a, dtype=dtype)


@dataclass(frozen=True)
class Chain:
    """The product ``M_0 Σ_1 M_1 ... Σ_T M_T`` (module docstring).

    Attributes
    ----------
    top : array, shape (R, d_1)
        ``M_0``, exact.  Numpy, or a lazy (dask / zarr-backed) array that the engine slices itself.
    mats : tuple of array
        ``M_1 .. M_T``, ``mats[t - 1]`` of shape ``(d_t, d_{t+1})``.
    dl, du : tuple of ndarray
        ``dl[t - 1]``, ``du[t - 1]`` of shape ``(d_t,)``: ``0 <= dl <= σ' <= du`` for ``Σ_t``.
    direction : {"backward", "forward"}
        Backward: ``P_T`` is the Jacobian; forward: ``P_Tᵀ`` is (after ``finish`` for F1).
    finish_mat : ndarray or None
        F1 only: ``W(1)``, shape ``(n_1, n_0)``; the final interval product is ``hull([L, U]·[dl, du])ᵀ W(1)``.
    finish_dl, finish_du : ndarray or None, shape (n_1,)
        F1 only: the derivative bounds of hidden layer 1.
    names : tuple of str
        A label per level ``1..T`` (the network layer of ``Σ_t``), for messages and plans.
    panel : int
        GEMM panel width (:data:`DEFAULT_PANEL`).
    dtype : numpy dtype
        Arithmetic type (float64 by default; float32 is a speed option with its own rounding allowance).
    sparse_mats : tuple
        Opt-in (:meth:`with_sparse`): empty (the default: every product dense), or one entry per level,
        ``sparse_mats[t - 1]`` a ``scipy.sparse.csr_array`` copy of ``mats[t - 1]`` (same values, same dtype) for a
        pruned level, else ``None``.  The RecurJac level products ``M_{s-1}[alive, alive] @ X`` then run as sparse x
        dense; ``mats`` stays dense (the column panels ``V`` are still cut from it, and the products with a panel of a
        pruned level convert it: :func:`panel_products`).  Each output
        entry of a sparse product sums the row's stored entries in index order (at most ``d_s`` terms), so the
        rounding allowance and the blocking invariance hold unchanged; results equal the dense kernels' up to the
        summation order (not bitwise).  Level ``t``'s copy also drives the products with its column panel ``V``
        (step 1 of RecurJac, the magnitude chain, Fast-Lip: :func:`panel_products`).
    sparse_finish : scipy.sparse.csr_array or None
        F1 only, opt-in (:meth:`with_sparse`): CSR copy of ``finish_mat.T`` (``W(1)ᵀ``, shape ``(n_0, n_1)``) for a
        pruned first layer; the F1 finish then multiplies sparse x dense (:func:`finish_products`).
    """

    top: object
    mats: tuple
    dl: tuple
    du: tuple
    direction: str = "backward"
    finish_mat: object = None
    finish_dl: object = None
    finish_du: object = None
    names: tuple = ()
    panel: int = DEFAULT_PANEL
    dtype: object = np.float64
    sparse_mats: tuple = ()
    sparse_finish: object = None

    @property
    def row_tile(self) -> int:
        """Row tile of this chain's :func:`tile_matmul` products (:func:`row_tile_for` of its rows)."""
        return row_tile_for(self.top.shape[0])

    def __post_init__(self):
        T = len(self.mats)
        if len(self.dl) != T or len(self.du) != T:
            raise ShapeMismatchError(f"a chain of {T} matrices needs {T} derivative bounds, got {len(self.dl)}, {len(self.du)}")
        prev = int(self.top.shape[1])
        for t, (m, lo, hi) in enumerate(zip(self.mats, self.dl, self.du), start=1):
            if tuple(lo.shape) != (prev,) or tuple(hi.shape) != (prev,):
                raise ShapeMismatchError(f"chain level {t}: derivative bounds of shape {lo.shape} need ({prev},)")
            if int(m.shape[0]) != prev:
                raise ShapeMismatchError(f"chain level {t}: matrix of shape {tuple(m.shape)} needs {prev} rows")
            prev = int(m.shape[1])
        if int(self.panel) < 1:
            raise InputError(f"panel={self.panel!r} must be a positive integer")
        if self.sparse_mats:
            if len(self.sparse_mats) != T:
                raise ShapeMismatchError(f"sparse_mats needs one entry per level ({T}), got {len(self.sparse_mats)}")
            for t, (m, s) in enumerate(zip(self.mats, self.sparse_mats), start=1):
                if s is not None and tuple(s.shape) != tuple(m.shape):
                    raise ShapeMismatchError(f"chain level {t}: sparse matrix of shape {s.shape} needs {tuple(m.shape)}")
        if self.sparse_finish is not None:
            if self.finish_mat is None:
                raise ShapeMismatchError("sparse_finish needs a finish matrix (F1 chains only)")
            need = tuple(reversed(tuple(int(s) for s in self.finish_mat.shape)))
            if tuple(self.sparse_finish.shape) != need:
                raise ShapeMismatchError(f"sparse_finish of shape {self.sparse_finish.shape} needs {need} (W(1)ᵀ)")

    # -- shape ------------------------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        """``T``: the number of layer steps."""
        return len(self.mats)

    @property
    def n_rows(self) -> int:
        """``R``: the rows of the recursion."""
        return int(self.top.shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        """``(d_1, ..., d_{T+1})``: ``d_{t+1}`` is the width of state ``t``."""
        return (int(self.top.shape[1]), *(int(m.shape[1]) for m in self.mats))

    def state_width(self, t: int) -> int:
        """Columns of state ``t`` (``d_{t+1}``)."""
        return self.widths[t]

    @property
    def output_shape(self) -> tuple[int, int]:
        """``(m, n_0)`` of the Jacobian bounds after ``finish``."""
        R, w = self.n_rows, self.widths[-1]
        if self.finish_mat is not None:
            return (w, int(self.finish_mat.shape[1]))
        return (R, w) if self.direction == "backward" else (w, R)

    # -- constructors -----------------------------------------------------------------------------------------
    @classmethod
    def backward(
        cls,
        network,
        derivative_bounds: Sequence,
        *,
        dtype=np.float64,
        panel: int = DEFAULT_PANEL,
        sparse_threshold: float | None = None,
    ) -> "Chain":
        """The backward chain ``W(H) Σ(H-1) W(H-1) ... Σ(1) W(1)`` of a (materialised) network.

        Parameters
        ----------
        network : Network
            With the output selection already folded in (``network.with_outputs(C)``) and an identity output
            activation.
        derivative_bounds : sequence of (dl, du)
            Per affine layer ``k = 0..H-1`` (at least the ``H - 1`` hidden ones), shapes ``(n_{k+1},)``.
        sparse_threshold : float, optional
            Opt-in sparse kernels: see :meth:`with_sparse` (``None``: dense only, the default).
        """
        ws, db = _weights_and_bounds(network, derivative_bounds, dtype)
        H = len(ws)
        return cls(
            top=ws[H - 1],
            mats=tuple(ws[k] for k in range(H - 2, -1, -1)),
            dl=tuple(db[k][0] for k in range(H - 2, -1, -1)),
            du=tuple(db[k][1] for k in range(H - 2, -1, -1)),
            direction="backward",
            names=tuple(f"hidden layer {k + 1}" for k in range(H - 2, -1, -1)),
            panel=panel,
            dtype=np.dtype(dtype),
        )._sparse_opt_in(sparse_threshold)

    @classmethod
    def forward(
        cls,
        network,
        derivative_bounds: Sequence,
        start: int = 0,
        *,
        dtype=np.float64,
        panel: int = DEFAULT_PANEL,
        sparse_threshold: float | None = None,
    ) -> "Chain":
        """The forward chain ``W(1)ᵀ Σ(1) W(2)ᵀ ... Σ(H-1) W(H)ᵀ`` (``start = 0``, F0) or, for ``start = 1`` (F1),
        the chain of the sub-network from ``h(1)`` with the final interval product by ``Σ(1) W(1)``.

        A network without hidden layers has no sub-network; ``start = 1`` then gives the F0 chain (``J = W``).
        ``sparse_threshold``: opt-in sparse kernels, see :meth:`with_sparse`.
        """
        ws, db = _weights_and_bounds(network, derivative_bounds, dtype)
        H = len(ws)
        if start not in (0, 1):
            raise InputError(f"forward chain start={start!r}; accepted: 0 (F0) or 1 (F1)")
        if start == 1 and H >= 2:
            return cls(
                top=np.ascontiguousarray(ws[1].T),
                mats=tuple(np.ascontiguousarray(ws[k].T) for k in range(2, H)),
                dl=tuple(db[k][0] for k in range(1, H - 1)),
                du=tuple(db[k][1] for k in range(1, H - 1)),
                direction="forward",
                finish_mat=ws[0],
                finish_dl=db[0][0],
                finish_du=db[0][1],
                names=tuple(f"hidden layer {k + 1}" for k in range(1, H - 1)),
                panel=panel,
                dtype=np.dtype(dtype),
            )._sparse_opt_in(sparse_threshold)
        return cls(
            top=np.ascontiguousarray(ws[0].T),
            mats=tuple(np.ascontiguousarray(ws[k].T) for k in range(1, H)),
            dl=tuple(db[k][0] for k in range(0, H - 1)),
            du=tuple(db[k][1] for k in range(0, H - 1)),
            direction="forward",
            names=tuple(f"hidden layer {k + 1}" for k in range(0, H - 1)),
            panel=panel,
            dtype=np.dtype(dtype),
        )._sparse_opt_in(sparse_threshold)

    def _sparse_opt_in(self, threshold):
        return self if threshold is None else self.with_sparse(threshold)

    def with_sparse(self, threshold: float = KERNEL_SPARSE_THRESHOLD, *, levels=None) -> "Chain":
        """This chain with CSR copies of its pruned matrices (:attr:`sparse_mats`, :attr:`sparse_finish`).

        Level ``t`` gets one when ``density(mats[t - 1]) < threshold``, the F1 finish matrix ``W(1)`` when
        ``density(finish_mat) < threshold``.  ``threshold <= 0`` gives a chain without sparse matrices (dense
        kernels); ``threshold = inf`` keeps a copy of every selected matrix.  The bounds are the same real-number
        sums either way (sound; equal to the dense kernels' up to the summation order).

        Parameters
        ----------
        threshold : float
            Density threshold, ``>= 0``.
        levels : iterable of int, optional
            Only these levels are considered: ``t`` in ``1..T`` for ``mats[t - 1]``, ``T + 1`` for the F1 finish
            matrix (default: all).  Used by the engine to run exactly the layers a model store holds as CSR.
        """
        from ..network.sparse import density, to_csr

        thr = float(threshold)
        if not (thr >= 0.0):
            raise InputError(f"sparse threshold {threshold!r} must be a number >= 0")
        T = len(self.mats)
        sel = set(range(1, T + 2)) if levels is None else {int(x) for x in levels}
        bad = sorted(x for x in sel if not 1 <= x <= T + 1)
        if bad:
            raise InputError(f"sparse levels {bad} are outside 1..{T + 1} (T = {T} levels, T + 1 = the finish matrix)")
        sm = []
        for t, m in enumerate(self.mats, start=1):
            if t not in sel or thr <= 0 or 0 in m.shape:
                sm.append(None)
            elif thr == math.inf and hasattr(m, "to_csr"):  # a streamed matrix: read as CSR, never dense whole
                sm.append(m.to_csr(self.dtype))
            else:
                a = _np(m, self.dtype)
                sm.append(to_csr(a, dtype=self.dtype) if density(a) < thr else None)
        fin = None
        f = self.finish_mat
        if f is not None and (T + 1) in sel and thr > 0 and 0 not in f.shape:
            if thr == math.inf and hasattr(f, "to_csr"):
                fin = to_csr(f.to_csr(self.dtype).T, dtype=self.dtype)
            else:
                f = _np(f, self.dtype)
                if density(f) < thr:
                    fin = to_csr(np.ascontiguousarray(f.T), dtype=self.dtype)
        return replace(self, sparse_mats=tuple(sm) if any(x is not None for x in sm) else (), sparse_finish=fin)

    def level_layers(self) -> tuple[int, ...]:
        """The network layer (0-based weight index ``k`` of ``W(k+1)``) of each chain matrix: entry ``t - 1`` for
        ``mats[t - 1]`` (``t = 1..T``), then one more entry for the F1 finish matrix when there is one.

        Backward: ``mats[t - 1] = W(H - t)``, layer ``H - 1 - t`` (``H = T + 1``).  F0: ``mats[t - 1] = W(t + 1)ᵀ``,
        layer ``t``.  F1: ``mats[t - 1] = W(t + 2)ᵀ``, layer ``t + 1``, and the finish matrix ``W(1)``, layer 0.
        """
        T = len(self.mats)
        if self.direction == "backward":
            return tuple(T - t for t in range(1, T + 1))
        if self.finish_mat is not None:
            return (*(t + 1 for t in range(1, T + 1)), 0)
        return tuple(range(1, T + 1))

    def with_sparse_layers(self, layers) -> "Chain":
        """This chain with CSR copies of exactly the matrices that come from the given network layers (e.g. the
        layers a model store holds as CSR), whatever their density (:meth:`with_sparse` with ``threshold = inf``)."""
        wanted = {int(k) for k in layers}
        levels = [t for t, k in enumerate(self.level_layers(), start=1) if k in wanted]
        return self.with_sparse(math.inf, levels=levels) if levels else self.with_sparse(0.0)

    def sparse_levels(self) -> tuple[int, ...]:
        """The levels holding a CSR copy (``T + 1``: the finish matrix), the argument of
        ``with_sparse(inf, levels=...)`` that rebuilds exactly this choice (e.g. in a worker process)."""
        T = len(self.mats)
        out = [t for t, s in enumerate(self.sparse_mats, start=1) if s is not None]
        if self.sparse_finish is not None:
            out.append(T + 1)
        return tuple(out)

    @property
    def is_sparse(self) -> bool:
        """Whether any product of this chain runs sparse x dense."""
        return bool(self.sparse_mats) or self.sparse_finish is not None

    def with_panel(self, panel: int) -> "Chain":
        return replace(self, panel=int(panel))

    # -- per-process memo -------------------------------------------------------------------------------------
    def memo(self) -> dict:
        """A dict for values that depend on this chain alone (not on rows, columns or blocking), computed once per
        process and reused by every task that runs on this chain object (e.g. the shared factors of
        :func:`recurjac_scale.jacobian.recurjac.uses_sharing` steps).  Not pickled and not copied by
        :func:`dataclasses.replace`: a worker that receives a chain starts with an empty memo."""
        m = self.__dict__.get("_memo")
        if m is None:
            m = {}
            object.__setattr__(self, "_memo", m)
        return m

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_memo", None)
        return state

    # -- rounding ---------------------------------------------------------------------------------------------
    def rounding_length(self, t: int) -> int:
        """``N_t`` of the module docstring: a bound on the number of roundings on any path of step ``t``."""
        return 3 * sum(int(d.shape[0]) for d in self.dl[:t]) + 4 * t + 4 + (0 if self.dtype == np.float64 else 4 * t + 4)


def sparse_chain(chain: Chain, option, stored_layers=()) -> Chain:
    """Apply a sparse-kernel option to a chain (the one policy shared by the API, the engine and the CLI).

    Parameters
    ----------
    chain : Chain
    option : None, "auto" or float
        ``None``: dense kernels (the chain unchanged).  ``"auto"``: CSR copies of exactly the matrices of the
        layers listed in ``stored_layers`` (the layers a model store holds as CSR, :meth:`Chain.with_sparse_layers`).
        A number: :meth:`Chain.with_sparse` with that density threshold (``0`` disables).
    stored_layers : iterable of int
        0-based layer indices stored sparse (``Network.provenance["sparse_layers"]`` of a store-backed network).

    Raises
    ------
    InputError
        Any other option.
    """
    if option is None:
        return chain
    if isinstance(option, str):
        if option.strip().lower() == "auto":
            layers = tuple(stored_layers or ())
            return chain.with_sparse_layers(layers) if layers else chain
        try:
            option = float(option)
        except ValueError:
            raise InputError(f"sparse threshold {option!r} not understood; accepted: 'auto' or a density >= 0") from None
    return chain.with_sparse(option)


def stored_sparse_layers(network) -> tuple[int, ...]:
    """The layers a store-backed network holds as CSR (its provenance's ``sparse_layers``; empty otherwise)."""
    prov = getattr(network, "provenance", None) or {}
    layers = prov.get("sparse_layers") or ()
    try:
        return tuple(sorted(int(k) for k in layers))
    except (TypeError, ValueError):
        return ()


def _weights_and_bounds(network, derivative_bounds, dtype):
    if network.n_layers >= 1 and not network.output_activation.is_identity:
        raise InputError("fold the output activation first: network.with_outputs(C) makes it a hidden layer")
    ws = [cast_weights(_np(w), dtype, f"weights of layer {k + 1}") for k, w in enumerate(network.weights)]
    H = len(ws)
    if len(derivative_bounds) < H - 1:
        raise ShapeMismatchError(f"{H - 1} hidden layers need derivative bounds, got {len(derivative_bounds)}")
    db = []
    for k in range(H - 1):
        lo, hi = derivative_bounds[k]
        lo, hi = _np(lo, dtype), _np(hi, dtype)
        n = ws[k].shape[0]
        if lo.shape != (n,) or hi.shape != (n,):
            raise ShapeMismatchError(f"derivative bounds of layer {k} have shapes {lo.shape}, {hi.shape}; need ({n},)")
        if not (np.all(lo >= 0) and np.all(lo <= hi) and np.all(np.isfinite(hi))):
            raise InputError(
                f"derivative bounds of layer {k} violate 0 <= dl <= du < inf (Assumption 2 of Zhang et al. 2019)"
            )
        db.append(_outward(lo, hi, derivative_bounds[k], dtype))
    return ws, db


def _outward(lo, hi, orig, dtype):
    """Derivative bounds cast to ``dtype`` without losing soundness: round ``dl`` down and ``du`` up."""
    if np.dtype(dtype) == np.float64:
        return lo, hi
    lo64, hi64 = (np.asarray(a, dtype=np.float64) for a in orig)
    lo = np.where(lo.astype(np.float64) > lo64, np.nextafter(lo, np.asarray(0, dtype)), lo)
    hi = np.where(hi.astype(np.float64) < hi64, np.nextafter(hi, np.asarray(np.inf, dtype)), hi)
    return np.maximum(lo, 0).astype(dtype), hi.astype(dtype)


def derivative_bounds_for(network, lb) -> list[tuple[np.ndarray, np.ndarray]]:
    """Derivative bounds ``(dl, du)`` of every hidden layer of ``network`` from pre-activation bounds ``lb``
    (Eq. 6-8), intersected with the activation's global derivative range (both are sound); split constraints
    (``lb.phases``) fix the derivative of the split neurons (:func:`recurjac_scale.layer_bounds.base.apply_phases`)."""
    H = network.n_layers
    if len(lb.lower) < H - 1:
        raise ShapeMismatchError(f"layer bounds for {len(lb.lower)} layers; the network has {H - 1} hidden layers")
    out = []
    for k in range(H - 1):
        act = network.activations[k]
        lo, hi = np.asarray(lb.lower[k], np.float64), np.asarray(lb.upper[k], np.float64)
        if lo.shape != (network.widths[k + 1],) or hi.shape != lo.shape:
            raise ShapeMismatchError(
                f"layer bounds of layer {k} have shape {lo.shape}; need ({network.widths[k + 1]},)"
            )
        if np.isnan(lo).any() or np.isnan(hi).any() or (lo > hi).any():
            raise InputError(f"layer bounds of layer {k} are NaN or empty (lower > upper)")
        dl, du = act.derivative_bounds(lo, hi)
        phases = getattr(lb, "phases", None)
        if phases is not None and k < len(phases):
            dl, du = apply_phases(act, dl, du, phases[k])
        rlo, rhi = act.derivative_range
        dl = np.maximum(np.asarray(dl, np.float64), rlo)
        du = np.minimum(np.asarray(du, np.float64), rhi)
        out.append((dl, du))
    return out


def top_state(chain: Chain, rows=slice(None)) -> dict:
    """State 0 (exact) for the given rows: ``lower = upper = M_0[rows]``, ``mag = |M_0[rows]|``."""
    a = _np(chain.top[rows], chain.dtype)
    return {"lower": a, "upper": a, "mag": np.abs(a)}


def widening(chain: Chain, t: int, mag: np.ndarray, n: int | None = None) -> np.ndarray:
    """Outward rounding allowance of step ``t``: ``gamma(N) * mag * (1 + gamma) + tiny`` with ``N = N_t``
    (module docstring) unless a (local) summation length ``n`` is given; :func:`recurjac_scale._fp.gamma` is twice
    Higham's factor.

    For a step of the recursion (``n`` not given) an underflow allowance :func:`underflow_allowance` is added: a
    product that underflows is then multiplied by later factors of the chain, which the relative bound
    ``gamma * mag`` does not see.  A local computation (``n`` given: Fast-Lip, the F1 finish, whose inputs are
    certified floats used as they are) only loses ``n`` underflows of at most ``tiny`` each."""
    local = n is not None
    n = chain.rounding_length(t) if n is None else int(n)
    g = gamma(n, chain.dtype)
    tiny = np.finfo(chain.dtype).tiny * n
    if not local:
        tiny = tiny + underflow_allowance(chain, t)
    with np.errstate(over="ignore"):
        return (g * (1.0 + g)) * mag + tiny


def sign_slack(chain: Chain, t: int, mag: np.ndarray) -> np.ndarray:
    """The slack with which step ``t``'s widened bounds are classed by sign at a later step
    (:func:`recurjac_scale.kernels.prep_level`): ``2^t`` times the rounding allowance ``w_t`` of step ``t``
    (:func:`widening`), shape of ``mag`` (``(R, d)``).

    ALGORITHM.md classes a neuron by the sign of its computed (unwidened) bound: a lower bound computed as an
    exact zero puts it in ``P_j``.  Here the stored bound is ``L = c - w_t``, and ``c`` also holds the outward
    corrections that ``prep_level`` added at the levels of step ``t`` for neurons classed this way earlier; each
    is at most ``(du - dl) * slack_{s} * |x| <= slack_s / w_s * w_t`` (the magnitude chain dominates
    ``mag_s D(du) |x|``), so an oracle-zero bound satisfies ``L >= -(1 + sum_{s<t} 2^s) w_t (1 + u) >= -2^t w_t``.
    Any slack is sound (``prep_level`` adds the correction for the residual ``max(0, -L)``); this one only decides
    which neurons are expanded (Term II), as ALGORITHM.md does, up to ties within ``2^t w_t`` of zero."""
    with np.errstate(over="ignore"):
        return widening(chain, t, mag) * float(2.0**t)


def _abs_sum_bound(m) -> float:
    """An upper bound of ``max(max row sum, max column sum)`` of ``|m|`` (float64, rounded up)."""
    if hasattr(m, "panel_rows"):  # a streamed matrix (engine.streaming.StoreMatrix): one row panel at a time
        n_rows, n_cols = (int(x) for x in m.shape)
        if n_rows == 0 or n_cols == 0:
            return 0.0
        step = max(1, int(m.panel_rows()))
        rmax, csum = 0.0, np.zeros(n_cols)
        with np.errstate(over="ignore"):
            for r0 in range(0, n_rows, step):
                a = np.abs(np.asarray(m[r0 : min(n_rows, r0 + step), :], dtype=np.float64))
                rmax = max(rmax, float(a.sum(axis=1).max()))
                csum += a.sum(axis=0)
            r = max(rmax, float(csum.max()))
        return r * (1.0 + gamma(max(n_rows, n_cols)))
    a = np.abs(_np(m, np.float64))
    if a.size == 0:
        return 0.0
    with np.errstate(over="ignore"):
        r = max(float(a.sum(axis=1).max()), float(a.sum(axis=0).max()))
    return r * (1.0 + gamma(max(a.shape)))


def underflow_allowance(chain: Chain, t: int) -> float:
    """Absolute allowance for underflow in step ``t`` of the recursion: ``2 eta Lambda_t N_t^2``.

    ``eta`` (:func:`recurjac_scale._fp.underflow_unit`) bounds the error of one multiplication whose result
    underflows (additions are exact then).  Every value a step computes is built from products of entries of
    ``M_0, ..., M_t``, of derivative bounds ``<= du`` and of earlier bounds (which are themselves dominated by
    such products), so the error of one underflow reaching an output entry is multiplied by at most
    ``Lambda_t = prod_{s<=t} max(1, ||M_s||) * prod_{s<=t} max(1, max du_s)``, with ``||M||`` the larger of the
    largest absolute row and column sums (every factor applied after the underflow is a sub-product of the
    chain; an output entry sums over the neurons of a level with weights whose absolute sum is bounded by those
    norms).  A path of the recursion has at most ``N_t`` multiplications per level entry and the shared
    variant's products have length ``<= sum d <= N_t``, so ``N_t^2`` bounds the number of underflows that reach
    one entry.  Chain-only: computed once per process (:meth:`Chain.memo`).  For a network of ordinary scale
    this is far below ``gamma * mag`` (e.g. ``1e-280`` on the paper's CIFAR shape); it matters only where
    partial products fall below the smallest normal number (weights like ``1e-170``).
    """
    memo = chain.memo()
    norms = memo.get("abs_sum_bounds")
    if norms is None:
        norms = (_abs_sum_bound(chain.top), *(_abs_sum_bound(m) for m in chain.mats))
        memo["abs_sum_bounds"] = norms
    lam = 1.0
    for s in range(t + 1):
        lam *= max(1.0, norms[s])
    for s in range(t):
        du = chain.du[s]
        lam *= max(1.0, float(np.max(du)) if du.size else 0.0)
    n = chain.rounding_length(t)
    return 2.0 * underflow_unit(chain.dtype) * lam * float(n) * float(n)


def widen_outward(lower: np.ndarray, upper: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lower - w, upper + w)``; a NaN (only possible after an overflow) becomes ``-inf`` / ``+inf``, which keeps
    the bounds sound."""
    lo = lower - w
    hi = upper + w
    if np.isnan(lo).any() or np.isnan(hi).any():
        lo = np.where(np.isnan(lo), -np.inf, lo)
        hi = np.where(np.isnan(hi), np.inf, hi)
    return lo, hi


# -- canonical GEMMs -------------------------------------------------------------------------------------------
# BLAS results depend on the shapes of the call (kernel choice, edge handling); a column computed inside a call of
# fixed shape does not depend on its position or on the other columns.  These helpers therefore always call BLAS
# with fixed-width panels (zero padding), which makes the results independent of the blocking.


def panel_matmul(M: np.ndarray, X: np.ndarray, panel: int, out: np.ndarray | None = None) -> np.ndarray:
    """``M @ X`` computed panel by panel.

    Parameters
    ----------
    M : ndarray, shape (a, K)
        A matrix that does not depend on the blocking (a chain matrix, possibly with dead neurons removed).
    X : ndarray, shape (K, N)
        ``N`` must be a multiple of ``panel`` (pad with zero columns).
    """
    a, K = M.shape
    N = X.shape[1]
    if N % panel:
        raise ValueError("panel_matmul needs a column count that is a multiple of the panel")
    if out is None:
        out = np.empty((a, N), dtype=np.result_type(M.dtype, X.dtype))
    if a == 0 or N == 0:
        return out
    if K == 0:
        out[...] = 0
        return out
    if _sp is not None and _sp.issparse(M):
        # Sparse x dense (a pruned chain matrix, Chain.sparse_mats): each output entry sums the row's stored
        # entries in index order whatever the other columns are, so one call equals the panel-by-panel result
        # bitwise (blocking invariance) and its summation length is <= K (rounding allowance unchanged).
        out[...] = M @ X
        return out
    for p in range(0, N, panel):
        np.matmul(M, X[:, p : p + panel], out=out[:, p : p + panel])
    return out


def tile_matmul(A: np.ndarray, B: np.ndarray, panel: int, row_tile: int = ROW_TILE) -> np.ndarray:
    """``A @ B`` on fixed ``row_tile x panel`` output tiles (both operands zero-padded), for products where both
    operands depend on the blocking (rows of a block times a column panel).

    Parameters
    ----------
    A : ndarray, shape (R, K)
    B : ndarray, shape (K, c)

    Returns
    -------
    ndarray, shape (R, c)
    """
    R, K = A.shape
    c = B.shape[1]
    dt = np.result_type(A, B)
    if R == 0 or c == 0:
        return np.zeros((R, c), dtype=dt)
    if K == 0:
        return np.zeros((R, c), dtype=dt)
    Rp = -(-R // row_tile) * row_tile
    cp = -(-c // panel) * panel
    # (an operand that needs no padding is used as it is when it has the padded copy's layout: same bits)
    if Rp == R and A.dtype == dt and A.flags.c_contiguous:
        Ap = A
    else:
        Ap = np.zeros((Rp, K), dtype=dt)
        Ap[:R] = A
    if cp == c and B.dtype == dt and B.flags.c_contiguous:
        Bp = B
    else:
        Bp = np.zeros((K, cp), dtype=dt)
        Bp[:, :c] = B
    out = np.empty((Rp, cp), dtype=dt)
    for i in range(0, Rp, row_tile):
        for p in range(0, cp, panel):
            np.matmul(Ap[i : i + row_tile], Bp[:, p : p + panel], out=out[i : i + row_tile, p : p + panel])
    return out[:R, :c]


# -- products with a pruned column panel / finish matrix (opt-in, Chain.sparse_mats / Chain.sparse_finish) ---------
# The dense products above go through fixed-shape BLAS calls; a sparse product gets the same blocking invariance
# from scipy's kernel instead: ``csr_matvecs`` computes output row i as ``y_i = 0; y_i += a_ij x_j`` over the stored
# entries j of row i in index order, one independent lane per column of ``x`` (an axpy), so every output entry is
# the same sequential sum whatever the other rows and columns are (tests/test_sparse_chain_products.py checks it
# bitwise under changed row and column sets).  Its summation length is the number of stored entries of the row,
# <= the dense length, so every rounding allowance written for the dense product covers it.  Skipping the zero
# entries is exact: a real (finite) bounded quantity times 0 is 0, so even an overflowed (infinite) left factor
# loses nothing sound by not being multiplied by a structural zero.


def level_is_sparse(chain: Chain, t: int) -> bool:
    """Whether level ``t`` (``mats[t - 1]``) of the chain holds a CSR copy (a chain-only, blocking-independent
    choice)."""
    return bool(chain.sparse_mats) and chain.sparse_mats[t - 1] is not None


def panel_csr_t(V: np.ndarray):
    """``Vᵀ`` as a canonical ``scipy.sparse.csr_array`` (sorted indices, no explicit zeros), shape ``(c, d)`` for a
    dense column panel ``V`` of shape ``(d, c)``: row ``k`` holds the stored entries of column ``k`` of ``V``, which
    depend on that column alone (not on which other columns the panel has)."""
    a = _sp.csr_array(np.ascontiguousarray(np.asarray(V).T))
    a.eliminate_zeros()
    a.sort_indices()
    return a


def _csr_times_dense_t(B, A: np.ndarray) -> np.ndarray:
    """``(B @ Aᵀ)ᵀ`` = ``A @ Bᵀ`` as a C-contiguous dense array: ``B`` CSR ``(c, d)``, ``A`` dense ``(R, d)``;
    output ``(R, c)``, entry ``[i, k]`` = the fixed-order sum over the stored entries of ``B[k]``."""
    R = A.shape[0]
    c = B.shape[0]
    if R == 0 or c == 0:
        return np.zeros((R, c), dtype=np.result_type(A.dtype, B.dtype))
    out = B @ np.ascontiguousarray(A.T)
    return np.ascontiguousarray(np.asarray(out).T)


def live_neurons(chain: Chain, t: int) -> np.ndarray:
    """Indices of the neurons of level ``t`` with ``du > 0`` (the others are dead: every product through them is an
    exact zero).  Depends on the chain alone."""
    return np.flatnonzero(chain.du[t - 1] > 0)


def unstable_neurons(chain: Chain, t: int) -> np.ndarray:
    """Indices of the neurons of level ``t`` with ``dl < du`` (the derivative interval has a radius).  Depends on the
    chain alone."""
    return np.flatnonzero(chain.dl[t - 1] < chain.du[t - 1])


def panel_products(chain: Chain, t: int, V: np.ndarray, *lefts) -> list:
    """``A @ V[keep]`` (or ``A @ |V[keep]|``) for each ``(A, absolute, keep)`` in ``lefts``: the products of a step
    with its column panel ``V = M_t[:, cols]`` (step 1 of RecurJac, the magnitude chain, Fast-Lip).

    ``keep`` selects the neurons of level ``t`` that take part (:func:`live_neurons`, :func:`unstable_neurons`): the
    caller's terms on the other neurons are exact zeros (a factor ``du = 0`` or ``du - dl = 0``), so they are not
    multiplied.  Dropping an exact-zero term leaves the real-number sum unchanged and the summation shorter (the
    allowances, written for ``d_t`` terms, cover it); ``keep`` depends on the chain alone, so the result stays
    independent of the blocking.  It also keeps an overflowed (infinite) left factor of a dead neuron out of the sum
    (``inf * 0`` would be NaN).

    Parameters
    ----------
    chain : Chain
    t : int
        The level whose panel ``V`` is (``1 <= t <= T``).
    V : ndarray, shape (d_t, c)
    lefts : ``(A, absolute)`` or ``(A, absolute, keep)``
        ``A`` of shape ``(R_blk, d_t)``, or ``(R_blk, keep.size)`` with ``keep`` an index array of level-``t``
        neurons.

    Returns
    -------
    list of ndarray, shape (R_blk, c)
        Dense levels: :func:`tile_matmul` (fixed tiles, as before).  A pruned level (:func:`level_is_sparse`):
        ``V[keep]ᵀ`` (or ``|V[keep]|ᵀ``) as CSR times ``Aᵀ`` (section comment above: fixed-order sums of at most
        ``d_t`` terms, so bitwise blocking-invariant and covered by the dense rounding allowance); each operand is
        converted once for all products.
    """
    sparse = level_is_sparse(chain, t)
    d = V.shape[0]
    operands: dict = {}

    def operand(keep, absolute):  # V[keep] (or its CSR transpose) gathered once, its absolute value once
        sel = None if keep is None else id(keep)
        key = (sel, absolute)
        if key not in operands:
            raw = (sel, "raw")
            if raw not in operands:
                Vk = V if keep is None else np.ascontiguousarray(V[keep])
                operands[raw] = panel_csr_t(Vk) if sparse else Vk
            operands[key] = abs(operands[raw]) if absolute else operands[raw]
        return operands[key]

    out = []
    for left in lefts:
        A, absolute = left[0], left[1]
        keep = left[2] if len(left) > 2 else None
        if keep is not None and keep.size == d:
            keep = None  # every neuron: the same product as without a selection
        if keep is not None and keep.size == 0:
            out.append(np.zeros((A.shape[0], V.shape[1]), dtype=np.result_type(A.dtype, V.dtype)))
            continue
        B = operand(keep, absolute)
        if sparse:
            out.append(_csr_times_dense_t(B, np.asarray(A)))
        else:
            out.append(tile_matmul(A, B, chain.panel, chain.row_tile))
    return out


def finish_products(chain: Chain, *rights, keep: np.ndarray | None = None) -> list:
    """``W(1)ᵀ @ B`` (or ``|W(1)ᵀ| @ B``) for each ``(B, absolute)`` in ``rights``: the F1 finish (``B`` of shape
    ``(n_1, m)``, or ``(keep.size, m)`` on the layer-1 neurons ``keep``; the result ``(n_0, m)``).

    Dense: :func:`tile_matmul` on ``W(1)ᵀ`` (its columns ``keep``: the caller's terms on the other neurons are exact
    zeros, as in :func:`panel_products`).  Pruned first layer (:attr:`Chain.sparse_finish`): CSR ``W(1)ᵀ`` times
    the dense ``B``; entry ``[k, i]`` sums the stored entries of row ``k`` (column ``k`` of ``W(1)``, at most ``n_1``
    terms) in index order, independent of the other columns of ``B`` (blocking-invariant, covered by the dense
    rounding allowance of :func:`recurjac_scale.jacobian.methods.finish_chain`).
    """
    S = chain.sparse_finish
    n_1 = int(chain.finish_mat.shape[0]) if S is None else int(S.shape[1])
    if keep is not None and keep.size == n_1:
        keep = None
    if S is None:
        W1T = np.asarray(chain.finish_mat, dtype=chain.dtype).T
        W1T = np.ascontiguousarray(W1T if keep is None else W1T[:, keep])
        absW1T = None
        out = []
        for B, absolute in rights:
            if absolute and absW1T is None:
                absW1T = np.abs(W1T)
            out.append(tile_matmul(absW1T if absolute else W1T, B, chain.panel, chain.row_tile))
        return out
    if keep is not None:
        S = _sp.csr_array(S[:, keep])
        S.sort_indices()
    absS = None
    out = []
    for B, absolute in rights:
        if absolute and absS is None:
            absS = abs(S)
        M = absS if absolute else S
        B = np.ascontiguousarray(B)
        if M.shape[0] == 0 or B.shape[1] == 0:
            out.append(np.zeros((M.shape[0], B.shape[1]), dtype=np.result_type(M.dtype, B.dtype)))
        else:
            out.append(np.ascontiguousarray(np.asarray(M @ B)))
    return out
