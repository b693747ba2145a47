"""Adapters registering the methods of :mod:`recurjac_scale.jacobian` (``fastlip``, ``recurjac-b``,
``recurjac-f0``, ``recurjac-f1``) with the engine (:data:`recurjac_scale.engine.blocks.BLOCK_METHODS`).

The adapter only translates the engine's calls (row and column *slices*, priors by step number) into the method's
block interface (``method.step(chain, t, V, priors)`` with ``V = M_t[:, cols]`` and ``priors[s]`` for
``s = 0..t-1``, state 0 being the exact top rows): nothing is computed here.
"""

from __future__ import annotations

import math

import numpy as np

from ..jacobian.chain import STATE_KEYS, top_state
from ..jacobian.driver import run_chain
from ..jacobian.methods import JACOBIAN_METHODS, JacobianMethod, get_jacobian_method
from ..errors import InputError
from .blocks import BLOCK_METHODS, ChainShape, register_block_method

__all__ = ["JacobianAdapter", "adapter_for"]


class JacobianAdapter:
    """:class:`recurjac_scale.engine.blocks.BlockMethod` for a :class:`JacobianMethod`."""

    def __init__(self, method: JacobianMethod):
        self.method = method
        self.name = method.name

    def build(self, network, derivative_bounds, sparse_levels=()):
        """The chain of ``network`` (output selection folded in) for the derivative bounds computed in the client
        (:func:`recurjac_scale.jacobian.derivative_bounds_for`, as the in-memory API), with CSR copies of the
        levels ``sparse_levels`` (``Chain.sparse_levels`` of the client's chain: the same choice in every process,
        whatever the matrices' density)."""
        chain = self.method.build_chain(network, derivative_bounds)
        return self.sparse(chain, sparse_levels)

    @staticmethod
    def sparse(chain, sparse_levels=()):
        """``chain`` with CSR copies of exactly the levels ``sparse_levels`` (empty: unchanged)."""
        if not sparse_levels:
            return chain
        return chain.with_sparse(math.inf, levels=tuple(sparse_levels))

    def shape(self, chain) -> ChainShape:
        T = chain.n_steps
        shares = ()
        if self.method.uses_all_priors:  # the recursion's own chain-only choice, for its memory model
            from ..jacobian import recurjac

            uses_sharing = getattr(recurjac, "uses_sharing", None)
            if uses_sharing is not None:
                shares = tuple(bool(uses_sharing(chain, t)) for t in range(1, T + 1))
        return ChainShape(
            unstable=tuple(
                int(np.count_nonzero((np.asarray(du) > 0) & (np.asarray(dl) < np.asarray(du))))
                for dl, du in zip(chain.dl, chain.du)
            ),
            shares=shares,
            n_rows=chain.n_rows,
            widths=tuple(chain.widths),
            live=tuple(int(np.count_nonzero(np.asarray(du) > 0)) for du in chain.du),
            priors=tuple(tuple(s for s in self.method.priors(t) if s >= 1) for t in range(1, T + 1)),
            state_keys=tuple(STATE_KEYS),
            depth="recursive" if self.method.uses_all_priors else "interval",
            panel=int(getattr(chain, "panel", 128)),
            level_nnz=_level_nnz(chain),
            sparse_bytes=_sparse_bytes(chain),
        )

    def step_block(self, chain, t: int, rows: slice, cols: slice, priors: dict) -> dict:
        V = np.asarray(chain.mats[t - 1][:, cols], dtype=chain.dtype)
        need = set(self.method.priors(t))
        pri = [None] * t
        for s in need:
            pri[s] = top_state(chain, rows) if s == 0 else priors[s]
        return self.method.step(chain, t, V, pri)

    def initial_state(self, chain) -> dict:
        return top_state(chain)

    def finish(self, chain, final: dict, cols: slice):
        lower, upper = self.method.finish(chain, final)
        return lower[:, cols], upper[:, cols]

    def in_memory(self, network, derivative_bounds, sparse_levels=()):
        chain = self.build(network, derivative_bounds, sparse_levels)
        lower, upper, _ = run_chain(self.method, chain, keep_states=False)
        return lower, upper


def _level_nnz(chain) -> tuple:
    """Per level: ``None`` (dense) or ``(nnz, nnz of the live block M_t[alive_t, alive_{t+1}])`` (sparse)."""
    sm = getattr(chain, "sparse_mats", ())
    if not sm:
        return ()
    T = chain.n_steps
    out = []
    for t, s in enumerate(sm, start=1):
        if s is None:
            out.append(None)
            continue
        rows = np.asarray(chain.du[t - 1]) > 0
        cols = np.asarray(chain.du[t]) > 0 if t < T else np.ones(s.shape[1], dtype=bool)
        live = s[np.flatnonzero(rows)][:, np.flatnonzero(cols)]
        out.append((int(s.nnz), int(live.nnz)))
    return tuple(out)


def _sparse_bytes(chain) -> int:
    from ..network.sparse import csr_nbytes

    mats = [s for s in getattr(chain, "sparse_mats", ()) if s is not None]
    fin = getattr(chain, "sparse_finish", None)
    if fin is not None:
        mats.append(fin)
    return int(sum(csr_nbytes(m) for m in mats))


def adapter_for(name: str) -> JacobianAdapter:
    """The adapter of a method of :data:`JACOBIAN_METHODS` (aliases accepted), registered under its name."""
    method = get_jacobian_method(name)
    if method.run is not None:
        raise InputError(f"Jacobian method {method.name!r} runs in memory only (jacobian_bounds); the engine accepts: "
                         + ", ".join(sorted(n for n, m in JACOBIAN_METHODS.items() if m.run is None)))
    if method.name not in BLOCK_METHODS:
        register_block_method(method.name, JacobianAdapter(method))
    return BLOCK_METHODS[method.name]


for _name, _m in list(JACOBIAN_METHODS.items()):
    if _m.run is None:  # whole-method runners (linear-jacobian) are in memory only
        adapter_for(_name)
