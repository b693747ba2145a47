"""The in-memory driver: the loop of :mod:`.chain` over (row block x column block) tasks, run in this process.

The scale engine replaces only this orchestration; it calls the same ``method.step`` block functions.
"""

from __future__ import annotations

import numpy as np

from .chain import STATE_KEYS, Chain, top_state
from .methods import JacobianMethod

__all__ = ["run_chain", "run_steps", "auto_blocks", "iter_blocks"]

_BUDGET = 96 * 2**20  # bytes for the per-level operand X of one task (a few copies live at once)


def iter_blocks(n: int, size: int | None):
    """Consecutive slices of ``range(n)`` of length ``size`` (the last one shorter); ``None`` = one block."""
    size = n if not size else int(size)
    if size < 1:
        raise ValueError("block size must be positive")
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))
    if n == 0:
        yield slice(0, 0)


def auto_blocks(chain: Chain, t: int, method: JacobianMethod | None = None, budget: int = _BUDGET) -> tuple[int, int]:
    """Default (row_block, col_block) for step ``t`` (blocking does not change the results).

    Fast-Lip keeps only ``R x c`` arrays: one block.  RecurJac's recursion operand is ``(max_s d_s) x 2 R_blk c``:
    up to 64 rows per block (GEMM row tiles stay full), and as many columns as keep it under ``budget`` bytes;
    when all columns fit, more rows.
    """
    R = chain.n_rows
    c = chain.state_width(t)
    if method is not None and not method.uses_all_priors:
        return max(1, R), max(1, c)
    dmax = max([int(chain.top.shape[1]), *(int(d.shape[0]) for d in chain.dl[:t])])
    item = np.dtype(chain.dtype).itemsize
    rb = max(1, min(R, 64))
    cb = max(1, budget // (dmax * 2 * rb * item))
    if cb >= c:
        cb = c
        rb = max(rb, min(R, budget // max(1, dmax * 2 * c * item)))
    return rb, cb


def run_chain(
    method: JacobianMethod,
    chain: Chain,
    *,
    row_block: int | None = None,
    col_block: int | None = None,
    keep_states: bool = True,
) -> tuple[np.ndarray, np.ndarray, list]:
    """Run ``method`` on ``chain`` in memory, block by block.

    Parameters
    ----------
    method : JacobianMethod
    chain : Chain
    row_block, col_block : int or None
        Block sizes (``None``: :func:`auto_blocks` per step).  The result is bitwise independent of them.
    keep_states : bool
        Keep every step's state (needed by RecurJac steps anyway; Fast-Lip needs only the last one).

    Returns
    -------
    lower, upper : ndarray, shape (m, n_0)
        Certified Jacobian bounds (after ``method.finish``).
    states : list of dict
        ``states[t]`` = the full state of step ``t`` (``"lower"``, ``"upper"``, ``"allowance"`` of shape
        ``(R, d_{t+1})``); entries no longer needed are ``None`` when ``keep_states`` is false.
    """
    states = run_steps(method, chain, row_block=row_block, col_block=col_block, keep_states=keep_states)
    lower, upper = method.finish(chain, states[-1])
    return lower, upper, states


def run_steps(
    method: JacobianMethod,
    chain: Chain,
    *,
    last: int | None = None,
    row_block: int | None = None,
    col_block: int | None = None,
    keep_states: bool = True,
) -> list:
    """The states ``0 .. last`` of ``method`` on ``chain`` (default ``last = chain.n_steps``), in memory, block by
    block: the loop of :func:`run_chain` without the finish (Algorithm 2 stops one step early).

    Returns
    -------
    list of dict
        ``states[t]`` as in :func:`run_chain`.
    """
    T = chain.n_steps if last is None else int(last)
    R = chain.n_rows
    states: list = [top_state(chain)]
    for t in range(1, T + 1):
        M_t = np.asarray(chain.mats[t - 1], dtype=chain.dtype)
        c_total = M_t.shape[1]
        rb, cb = auto_blocks(chain, t, method)
        rb = row_block or rb
        cb = col_block or cb
        out = {k: np.empty((R, c_total), dtype=chain.dtype) for k in STATE_KEYS}
        need = method.priors(t)
        for rows in iter_blocks(R, rb):
            priors = [
                {k: v[rows] for k, v in states[s].items()} if (s in need and states[s] is not None) else None
                for s in range(t)
            ]
            for cols in iter_blocks(c_total, cb):
                res = method.step(chain, t, M_t[:, cols], priors)
                for k in STATE_KEYS:
                    out[k][rows, cols] = res[k]
        states.append(out)
        if not keep_states and not method.uses_all_priors:
            states[t - 1] = None
    return states
