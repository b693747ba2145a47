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
``"upper"`` (certified bounds of ``P_t``) and ``"allowance"`` (what rounding may have cost them, module
:mod:`recurjac_scale.jacobian.rounding`).  State 0 is exact: :func:`top_state`.  A method (registry
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
block: :mod:`recurjac_scale.jacobian.products`), every numba reduction sums in a fixed order per row, and every choice between kernel variants depends on
the chain or on the row alone.  ``finish`` needs the whole last state (``R x m``; small).

The in-memory driver :func:`recurjac_scale.jacobian.driver.run_chain` is exactly this loop (block sizes from
:func:`recurjac_scale.jacobian.driver.auto_blocks`: Fast-Lip one block, RecurJac bounded by the operand memory).

Rounding
--------
Each step also returns ``"allowance"`` (shape ``(R_blk, c)``): a certified bound of how far its bounds may lie
from the exact-arithmetic recursion (:mod:`recurjac_scale.jacobian.rounding`, where the argument is written out:
each level's rounding is weighted by the certified priors of that level, so no magnitude chain is needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .._fp import cast_weights
from ..errors import InputError, ShapeMismatchError
from .products import (  # noqa: F401  (re-exported: the products were defined here before)
    ROW_TILE,
    ROW_TILE_MAX,
    finish_products,
    level_is_sparse,
    live_neurons,
    panel_csr_t,
    panel_matmul,
    panel_products,
    row_tile_for,
    tile_matmul,
    unstable_neurons,
)
from .derivative_bounds import derivative_bounds_for  # noqa: F401  (re-exported)
from .sparse_policy import KERNEL_SPARSE_THRESHOLD, sparse_chain, stored_sparse_layers  # noqa: F401  (re-exported)

__all__ = [
    "Chain",
    "LevelMatrix",
    "derivative_bounds_for",
    "top_state",
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

STATE_KEYS = ("lower", "upper", "allowance")
"""Keys of the per-row state every step returns (each ``(R_blk, c)``)."""

DEFAULT_PANEL = 128
"""GEMM panel width (columns per BLAS call).  Results depend on it, bitwise, so it is a property of the chain, not
of the blocking."""

@runtime_checkable
class LevelMatrix(Protocol):
    """A chain matrix that is not held in memory (e.g. a weight read from a model store on demand,
    :class:`recurjac_scale.network.store_matrix.StoreMatrix`).  A chain (:meth:`Chain.from_layers`) may hold one
    wherever it holds an array; the methods then read it only through this protocol:

    - ``shape`` ``(d_t, d_{t+1})``, ``ndim`` (2) and ``dtype``;
    - ``M[rows, cols]`` (slices or 1-d integer / boolean index arrays) -> ndarray: a step's column panel
      ``V = M_t[:, cols]``;
    - ``live_block(rows, cols, dtype) -> ndarray (len(rows), len(cols))``: the compacted block a level of the
      recursion multiplies (:func:`recurjac_scale.jacobian.recurjac.recurjac_step`), bitwise
      ``np.asarray(M, dtype)[np.ix_(rows, cols)]``, never the whole matrix;
    - ``panel_rows() -> int``: rows read at a time by ``np.asarray(M)`` (whole-matrix readers go panel by panel);
    - ``to_csr(dtype) -> scipy.sparse.csr_array``: the whole matrix as canonical CSR (a sparse level's copy);
    - ``np.asarray(M)``: the whole matrix (for other readers).

    Every value is the exact stored value, so a chain of level matrices gives bitwise the results of the same chain
    held in memory.
    """

    shape: tuple

    def __getitem__(self, idx) -> np.ndarray: ...

    def live_block(self, rows, cols, dtype=None) -> np.ndarray: ...

    def panel_rows(self) -> int: ...

    def to_csr(self, dtype=np.float64): ...

    def __array__(self, dtype=None, copy=None) -> np.ndarray: ...


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
        return cls.from_layers(len(ws), db, _held(ws), dtype=dtype, panel=panel)._sparse_opt_in(sparse_threshold)

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
        return cls.from_layers(
            len(ws), db, _held(ws), direction="forward", start=start, dtype=dtype, panel=panel
        )._sparse_opt_in(sparse_threshold)

    @classmethod
    def from_layers(
        cls,
        n_layers: int,
        derivative_bounds: Sequence,
        matrix: Callable,
        *,
        direction: str = "backward",
        start: int = 0,
        dtype=np.float64,
        panel: int = DEFAULT_PANEL,
    ) -> "Chain":
        """The chain of a network of ``n_layers`` affine layers whose matrices come from a factory: the index
        arithmetic of :meth:`backward` and :meth:`forward` (F0, F1) in one place.

        Parameters
        ----------
        n_layers : int
            ``H``.
        derivative_bounds : sequence of (dl, du)
            Per hidden layer ``k = 0..H-2``, shapes ``(n_{k+1},)``, already in ``dtype``.
        matrix : callable
            ``matrix(k, transpose, live_rows)``: the weight ``W(k+1)`` (shape ``(n_{k+1}, n_k)``), or its transpose,
            as an array or a :class:`LevelMatrix`.  ``live_rows`` (bool, one per row) marks the rows a step reads
            (the neurons of the level with ``du > 0``) for a chain matrix, ``None`` for the top and the F1 finish
            matrix; a factory may ignore it.  Held weights: :meth:`backward`, :meth:`forward`; weights streamed
            from a model store: :func:`recurjac_scale.engine.streaming.streamed_chain`.
        direction : {"backward", "forward"}
        start : {0, 1}
            Forward chains: F0 or F1 (a network without hidden layers gives F0 for both).
        """
        H = int(n_layers)
        db = derivative_bounds
        if direction not in ("backward", "forward"):
            raise InputError(f"chain direction={direction!r}; accepted: 'backward' or 'forward'")
        if start not in (0, 1):
            raise InputError(f"forward chain start={start!r}; accepted: 0 (F0) or 1 (F1)")
        common = dict(direction=direction, panel=panel, dtype=np.dtype(dtype))
        if direction == "backward":  # M_0 = W(H), M_t = W(H - t): rows of M_t are the neurons of hidden layer H - t
            ks = range(H - 2, -1, -1)
            return cls(
                top=matrix(H - 1, False, None),
                mats=tuple(matrix(k, False, db[k][1] > 0) for k in ks),
                dl=tuple(db[k][0] for k in ks),
                du=tuple(db[k][1] for k in ks),
                names=tuple(f"hidden layer {k + 1}" for k in ks),
                **common,
            )
        first = 1 if (start == 1 and H >= 2) else 0  # F1: the F0 chain of the sub-network from h(1)
        ks = range(first + 1, H)  # M_t = W(k+1)ᵀ: rows of M_t are the neurons of hidden layer k
        return cls(
            top=matrix(first, True, None),
            mats=tuple(matrix(k, True, db[k - 1][1] > 0) for k in ks),
            dl=tuple(db[k][0] for k in range(first, H - 1)),
            du=tuple(db[k][1] for k in range(first, H - 1)),
            names=tuple(f"hidden layer {k + 1}" for k in range(first, H - 1)),
            **({"finish_mat": matrix(0, False, None), "finish_dl": db[0][0], "finish_du": db[0][1]} if first else {}),
            **common,
        )

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
            elif thr == math.inf and isinstance(m, LevelMatrix):  # read as CSR, never dense whole
                sm.append(m.to_csr(self.dtype))
            else:
                a = _np(m, self.dtype)
                sm.append(to_csr(a, dtype=self.dtype) if density(a) < thr else None)
        fin = None
        f = self.finish_mat
        if f is not None and (T + 1) in sel and thr > 0 and 0 not in f.shape:
            if thr == math.inf and isinstance(f, LevelMatrix):
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
        :func:`recurjac_scale.jacobian.recurjac_shared.uses_sharing` steps).  Not pickled and not copied by
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


def _held(ws):
    """The :meth:`Chain.from_layers` factory of held weights ``ws`` (a transpose is a C-contiguous copy)."""

    def matrix(k, transpose, live_rows):
        return np.ascontiguousarray(ws[k].T) if transpose else ws[k]

    return matrix


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


def top_state(chain: Chain, rows=slice(None)) -> dict:
    """State 0 (exact) for the given rows: ``lower = upper = M_0[rows]``, ``allowance = 0``."""
    a = _np(chain.top[rows], chain.dtype)
    return {"lower": a, "upper": a, "allowance": np.zeros_like(a)}
