"""Adapters registering the methods of :mod:`recurjac_scale.jacobian` (``fastlip``, ``recurjac-b``,
``recurjac-f0``, ``recurjac-f1``) with the engine (:data:`recurjac_scale.engine.blocks.BLOCK_METHODS`).

The adapter only translates the engine's calls (row and column *slices*, priors by step number) into the method's
block interface (``method.step(chain, t, V, priors)`` with ``V = M_t[:, cols]`` and ``priors[s]`` for
``s = 0..t-1``, state 0 being the exact top rows): nothing is computed here.
"""

from __future__ import annotations

import numpy as np

from ..jacobian.chain import STATE_KEYS, top_state
from ..jacobian.driver import run_chain
from ..jacobian.methods import JACOBIAN_METHODS, JacobianMethod, get_jacobian_method
from .blocks import BLOCK_METHODS, ChainShape, register_block_method

__all__ = ["JacobianAdapter", "adapter_for"]


class JacobianAdapter:
    """:class:`recurjac_scale.engine.blocks.BlockMethod` for a :class:`JacobianMethod`."""

    def __init__(self, method: JacobianMethod):
        self.method = method
        self.name = method.name

    def build(self, network, derivative_bounds):
        """The chain of ``network`` (output selection folded in) for the derivative bounds computed in the client
        (:func:`recurjac_scale.jacobian.derivative_bounds_for`, as the in-memory API)."""
        return self.method.build_chain(network, derivative_bounds)

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

    def in_memory(self, network, derivative_bounds):
        lower, upper, _ = run_chain(self.method, self.build(network, derivative_bounds), keep_states=False)
        return lower, upper


def adapter_for(name: str) -> JacobianAdapter:
    """The adapter of a method of :data:`JACOBIAN_METHODS` (aliases accepted), registered under its name."""
    method = get_jacobian_method(name)
    if method.name not in BLOCK_METHODS:
        register_block_method(method.name, JacobianAdapter(method))
    return BLOCK_METHODS[method.name]


for _name in list(JACOBIAN_METHODS):
    adapter_for(_name)
