"""The sparse-kernel policy: which chain matrices run as CSR sparse x dense (pruned layers).

One policy shared by :func:`recurjac_scale.jacobian.jacobian_bounds`, the engine and the command line: ``None``
(dense kernels), ``"auto"`` (exactly the layers a model store holds as CSR) or a density threshold
(:meth:`recurjac_scale.jacobian.chain.Chain.with_sparse`).  The products themselves are in
:mod:`recurjac_scale.jacobian.products`.
"""

from __future__ import annotations

import math

from ..errors import InputError

__all__ = ["KERNEL_SPARSE_THRESHOLD", "sparse_chain", "stored_sparse_layers", "with_sparse_levels"]

KERNEL_SPARSE_THRESHOLD = 0.15
"""Density below which :meth:`Chain.with_sparse` (default) keeps a CSR copy of a chain matrix for the RecurJac
level products (a pruned layer; sparse x dense in ``scipy.sparse`` beats BLAS only well below 30% density)."""


def sparse_chain(chain, option, stored_layers=()):
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
    layers = network.provenance.get("sparse_layers") or ()
    try:
        return tuple(sorted(int(k) for k in layers))
    except (TypeError, ValueError):
        return ()


def with_sparse_levels(chain, levels=()):
    """``chain`` with CSR copies of exactly the levels ``levels`` (``Chain.sparse_levels()`` of another build of the
    same chain: the same choice in every process, whatever the matrices' density); empty: ``chain`` unchanged."""
    if not levels:
        return chain
    return chain.with_sparse(math.inf, levels=tuple(levels))
