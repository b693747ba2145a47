"""The network model: a multi-layer perceptron as in Zhang et al. (2019).

``z(k+1) = W[k] h(k) + b[k]``, ``h(k+1) = sigma_k(z(k+1))`` for the hidden layers, and ``f = W[H-1] h(H-1) + b[H-1]``
followed by an optional output activation.  Layers are 0-based in code: ``weights[k]`` has shape
``(n_{k+1}, n_k)`` (out, in), as ``W^(k+1)`` in the paper and as in PyTorch.

The model also carries its input metadata (:class:`InputSpec`): the input shape and flattening order, the input
domain box ``D`` and an input normalisation ``(x - mean) / std``, which is folded into the first layer in float64
(the original ``mean`` and ``std`` are kept in the metadata).  Inputs to :meth:`Network.forward` and to every bound
algorithm are raw inputs, in the domain's units.

:meth:`Network.forward` and :meth:`Network.jacobian` are exact float64 evaluations: the ground truth every bound is
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from ..activations import Activation, Identity, get_activation
from ..errors import InputError, NonFiniteError, ShapeMismatchError

__all__ = ["InputSpec", "Network"]


def _is_lazy(a) -> bool:
    return not isinstance(a, np.ndarray) and hasattr(a, "compute") and hasattr(a, "chunks")


def _to_numpy(a, dtype=np.float64) -> np.ndarray:
    if _is_lazy(a):
        a = a.compute()
    return np.asarray(a, dtype=dtype)


@dataclass(frozen=True)
class InputSpec:
    """Input metadata of a network.

    Attributes
    ----------
    shape : tuple of int
        Shape of one input before flattening, e.g. ``(1, 28, 28)``; ``prod(shape) == n_0``.
    layout : str
        How the flattened vector is ordered, e.g. ``"CHW"``, ``"HWC"`` or ``"flat"`` (row-major of ``shape``).
    domain_lower, domain_upper : ndarray of shape (n_0,) or None
        The input domain box ``D`` in raw input units (e.g. pixels in [0, 1]); ``None`` for an unbounded domain.
        The bound algorithms work on ``B_p[x0, eps] ∩ D``.
    mean, std : ndarray or None
        The original input normalisation ``(x - mean) / std`` (broadcast over ``shape``), kept for provenance; it
        is already folded into the first layer of the network.
    """

    shape: tuple[int, ...]
    layout: str = "flat"
    domain_lower: np.ndarray | None = None
    domain_upper: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if not shape or any(s <= 0 for s in shape):
            raise ShapeMismatchError(f"input shape {self.shape!r} must be a non-empty tuple of positive sizes")
        object.__setattr__(self, "shape", shape)
        n0 = self.size
        lo, hi = self.domain_lower, self.domain_upper
        if (lo is None) != (hi is None):
            raise InputError("an input domain needs both a lower and an upper bound")
        if lo is not None:
            lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (n0,)).copy()
            hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (n0,)).copy()
            if np.isnan(lo).any() or np.isnan(hi).any() or (lo > hi).any():
                bad = int(np.argmax(np.isnan(lo) | np.isnan(hi) | (lo > hi)))
                raise InputError(
                    f"input domain is empty or NaN at coordinate {bad}: [{lo[bad]}, {hi[bad]}]; need lower <= upper"
                )
            object.__setattr__(self, "domain_lower", lo)
            object.__setattr__(self, "domain_upper", hi)
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, np.atleast_1d(np.asarray(v, dtype=np.float64)))

    @property
    def size(self) -> int:
        """``n_0``, the number of input coordinates."""
        return int(np.prod(self.shape))

    @property
    def has_domain(self) -> bool:
        return self.domain_lower is not None

    def check(self, x: np.ndarray, *, atol: float = 0.0) -> np.ndarray:
        """Validate a batch of raw inputs: shape ``(n_0,)`` or ``(batch, n_0)`` (or ``shape`` / ``(batch, *shape)``),
        finite, inside the domain box.  Returns a float64 array of shape ``(batch, n_0)``."""
        x = np.asarray(x, dtype=np.float64)
        n0 = self.size
        if x.shape == self.shape or x.shape == (n0,):
            x = x.reshape(1, n0)
        elif x.ndim >= 2 and (x.shape[1:] == self.shape or x.shape[1:] == (n0,)):
            x = x.reshape(x.shape[0], n0)
        else:
            raise ShapeMismatchError(
                f"input of shape {x.shape} does not match the network's input shape {self.shape} (n_0 = {n0}); "
                f"give ({n0},), {self.shape} or a batch of either"
            )
        bad = ~np.isfinite(x)
        if bad.any():
            b, k = np.argwhere(bad)[0]
            raise NonFiniteError(
                f"input {b} coordinate {k} is {x[b, k]}; accepted: finite numbers ({int(bad.sum())} non-finite "
                "value(s) in all)"
            )
        if self.has_domain:
            out = (x < self.domain_lower - atol) | (x > self.domain_upper + atol)
            if out.any():
                b, k = np.argwhere(out)[0]
                raise InputError(
                    f"input {b} coordinate {k} = {x[b, k]:g} is outside the declared input domain "
                    f"[{self.domain_lower[k]:g}, {self.domain_upper[k]:g}]"
                )
        return x

    def normalization_vectors(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(mean, std)`` broadcast to flattened vectors of shape ``(n_0,)``, or ``None``."""
        if self.mean is None and self.std is None:
            return None
        mean = np.zeros(1) if self.mean is None else self.mean
        std = np.ones(1) if self.std is None else self.std
        return _broadcast_stat(mean, self.shape, self.layout), _broadcast_stat(std, self.shape, self.layout)

    def to_dict(self) -> dict:
        """JSON-able metadata (inverse: :meth:`from_dict`)."""

        def enc(v):
            if v is None:
                return None
            v = np.asarray(v, dtype=np.float64)
            if v.size and np.all(v == v.flat[0]):
                return float(v.flat[0])
            return v.tolist()

        return {
            "shape": list(self.shape),
            "layout": self.layout,
            "domain": None if not self.has_domain else [enc(self.domain_lower), enc(self.domain_upper)],
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        dom = d.get("domain")
        return cls(
            shape=tuple(d["shape"]),
            layout=d.get("layout", "flat"),
            domain_lower=None if dom is None else dom[0],
            domain_upper=None if dom is None else dom[1],
            mean=d.get("mean"),
            std=d.get("std"),
        )


_SPLIT = 134217729.0  # 2^27 + 1 (Dekker's splitting constant for float64)
_FOLD_SAFE = 1e280  # factors and products below this: Dekker's split and TwoProduct cannot overflow


def _fold_rows(C: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``C @ W`` correctly rounded entry by entry (``C``: (m, n_H), ``W``: (n_H, n)).

    The bound algorithms treat the folded output layer as the network's own weights, and their rounding
    allowances are relative to its entries: a plain dot product with cancellation (a general output matrix, e.g.
    ``[1, 1, -1]``) can be wrong by far more than one ulp of the result (even 0 instead of 1e-17), which no
    allowance covers.  Rows with at most one non-zero, or two non-zeros of magnitude 1 (selections and margins
    ``f_c - f_j``), are already correctly rounded by one product; other rows use exact products (Dekker's
    TwoProduct) summed correctly rounded (Shewchuk's partials, as ``math.fsum``;
    :func:`recurjac_scale.kernels.exact_dot_rows`).  Entries too large for the split keep the plain
    product.
    """
    from ..kernels import exact_dot_rows

    out = C @ W
    if out.size == 0:
        return out
    nnz = (C != 0).sum(axis=1)
    simple = (nnz <= 1) | ((nnz == 2) & (np.where(C != 0, np.abs(C), 1.0) == 1.0).all(axis=1))
    rows = []
    for i in np.flatnonzero(~simple):
        h = np.flatnonzero(C[i])
        cmax, wmax = float(np.abs(C[i, h]).max()), float(np.abs(W[h]).max()) if W.shape[1] else 0.0
        if not (cmax >= _FOLD_SAFE or wmax >= _FOLD_SAFE or cmax * wmax >= _FOLD_SAFE):
            rows.append(i)
    if rows:
        C64 = np.ascontiguousarray(C, dtype=np.float64)
        WT = np.ascontiguousarray(np.asarray(W, dtype=np.float64).T)
        exact_dot_rows(C64, WT, np.asarray(rows, dtype=np.int64), _SPLIT, out)
    return out


def _broadcast_stat(v: np.ndarray, shape: tuple[int, ...], layout: str) -> np.ndarray:
    """Broadcast a per-channel statistic (or a scalar, or a full array) to a flattened input vector."""
    v = np.asarray(v, dtype=np.float64).ravel()
    n0 = int(np.prod(shape))
    if v.size == 1:
        return np.full(n0, v[0])
    if v.size == n0:
        return v.copy()
    lay = layout.upper()
    if len(shape) == 3 and lay in ("CHW", "HWC"):
        c = shape[0] if lay == "CHW" else shape[2]
        if v.size == c:
            full = np.broadcast_to(v[:, None, None], shape) if lay == "CHW" else np.broadcast_to(v, shape)
            return np.ascontiguousarray(full).ravel()
    raise ShapeMismatchError(
        f"normalisation statistic of size {v.size} does not broadcast to input shape {shape} (layout {layout}); "
        "give a scalar, one value per channel, or one value per input coordinate"
    )


class Network:
    """A multi-layer perceptron with element-wise activations satisfying Assumption 2 of Zhang et al. (2019).

    Parameters
    ----------
    weights : sequence of array, each of shape (n_{k+1}, n_k)
        Affine weights, numpy arrays or lazy dask arrays (e.g. backed by a zarr store).
    biases : sequence of array, each of shape (n_{k+1},)
    activations : sequence of str or Activation, length ``len(weights) - 1``
        The activation of each hidden layer.
    output_activation : str, Activation or None
        Optional activation on the output layer (identity when ``None``).
    input_spec : InputSpec, optional
        Input metadata; defaults to a flat, unbounded input of size ``n_0``.
    provenance : dict, optional
        Where the model came from (source file, sha256, importer version, ...).
    validate : bool
        Check shapes always; check finiteness of numpy weights (lazy weights are checked by :meth:`validate`).

    Raises
    ------
    ShapeMismatchError, NonFiniteError, UnsupportedActivationError
    """

    def __init__(
        self,
        weights: Sequence[Any],
        biases: Sequence[Any],
        activations: Sequence[str | Activation | None],
        *,
        output_activation: str | Activation | None = None,
        input_spec: InputSpec | None = None,
        provenance: dict | None = None,
        validate: bool = True,
    ):
        weights = [w if _is_lazy(w) else np.asarray(w) for w in weights]
        biases = [b if _is_lazy(b) else np.asarray(b) for b in biases]
        if len(weights) == 0:
            raise ShapeMismatchError("a network needs at least one affine layer")
        if len(biases) != len(weights):
            raise ShapeMismatchError(f"{len(weights)} weight matrices but {len(biases)} bias vectors")
        acts = [get_activation(a) for a in activations]
        if len(acts) != len(weights) - 1:
            raise ShapeMismatchError(
                f"{len(weights)} affine layers need {len(weights) - 1} hidden activations, got {len(acts)}"
            )
        self.weights = weights
        self.biases = biases
        self.activations: list[Activation] = acts
        self.output_activation: Activation = get_activation(output_activation)
        n0 = int(weights[0].shape[1]) if getattr(weights[0], "ndim", 0) == 2 else -1
        self.input_spec = input_spec if input_spec is not None else InputSpec(shape=(max(n0, 1),))
        self.provenance = dict(provenance or {})
        self._check_shapes()
        if validate:
            self.validate(lazy=False)

    # -- structure ---------------------------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        prev = self.input_spec.size
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if getattr(w, "ndim", None) != 2:
                raise ShapeMismatchError(f"layer {k}: weight must be 2-D (out, in), got shape {tuple(w.shape)}")
            if 0 in tuple(w.shape):
                raise ShapeMismatchError(
                    f"layer {k}: weight of shape {tuple(w.shape)} has a zero-width side; accepted: at least one "
                    "neuron per layer and one input"
                )
            if w.shape[1] != prev:
                raise ShapeMismatchError(
                    f"layer {k}: weight of shape {tuple(w.shape)} expects {w.shape[1]} inputs but the previous "
                    f"layer has {prev} outputs"
                )
            if tuple(b.shape) != (w.shape[0],):
                raise ShapeMismatchError(
                    f"layer {k}: bias of shape {tuple(b.shape)} does not match weight rows {w.shape[0]}"
                )
            prev = int(w.shape[0])

    def validate(self, *, lazy: bool = True) -> None:
        """Check that every weight and bias is finite.

        Parameters
        ----------
        lazy : bool
            Also compute lazy (dask) arrays to check them; ``False`` checks only arrays already in memory.

        Raises
        ------
        NonFiniteError
            Naming the layer and array holding a NaN or infinity.
        """
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            for name, a in (("weight", w), ("bias", b)):
                if _is_lazy(a):
                    if not lazy:
                        continue
                    ok = bool(np.isfinite(a).all().compute())
                else:
                    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
                        raise ShapeMismatchError(f"layer {k} {name} has non-numeric dtype {a.dtype}")
                    ok = bool(np.isfinite(a).all())
                if not ok:
                    raise NonFiniteError(f"layer {k} {name} contains NaN or infinite values")

    @property
    def n_layers(self) -> int:
        """``H``, the number of affine layers."""
        return len(self.weights)

    @property
    def widths(self) -> tuple[int, ...]:
        """``(n_0, n_1, ..., n_H)``."""
        return (self.input_spec.size, *(int(w.shape[0]) for w in self.weights))

    @property
    def n_inputs(self) -> int:
        return self.widths[0]

    @property
    def n_outputs(self) -> int:
        return self.widths[-1]

    @property
    def layer_activations(self) -> list[Activation]:
        """The activation after every affine layer: the hidden ones, then the output activation."""
        return [*self.activations, self.output_activation]

    @property
    def n_parameters(self) -> int:
        return int(sum(int(np.prod(w.shape)) + int(b.shape[0]) for w, b in zip(self.weights, self.biases)))

    @property
    def is_lazy(self) -> bool:
        return any(_is_lazy(a) for a in (*self.weights, *self.biases))

    def materialize(self, dtype=np.float64) -> "Network":
        """A copy whose weights are in-memory numpy arrays of ``dtype`` (float64 by default)."""
        return self._replace(
            weights=[_to_numpy(w, dtype) for w in self.weights],
            biases=[_to_numpy(b, dtype) for b in self.biases],
        )

    def _replace(self, **changes) -> "Network":
        kw = dict(
            weights=self.weights,
            biases=self.biases,
            activations=self.activations,
            output_activation=self.output_activation,
            input_spec=self.input_spec,
            provenance=self.provenance,
        )
        kw.update(changes)
        return Network(
            kw.pop("weights"), kw.pop("biases"), kw.pop("activations"), validate=False, **kw
        )

    # -- transformations ---------------------------------------------------------------------------------------
    def with_normalization(self, mean, std) -> "Network":
        """Fold an input normalisation ``(x - mean) / std`` into the first layer, in float64.

        ``mean`` and ``std`` are scalars, per-channel vectors (for a ``CHW``/``HWC`` input) or full vectors.  The
        returned network takes raw inputs; ``input_spec.mean``/``std`` record the normalisation.
        """
        if self.input_spec.mean is not None or self.input_spec.std is not None:
            raise InputError("this network already has a folded input normalisation")
        spec = replace(self.input_spec, mean=np.atleast_1d(np.asarray(mean, float)), std=np.atleast_1d(np.asarray(std, float)))
        m, s = spec.normalization_vectors()
        if not (np.isfinite(m).all() and np.isfinite(s).all()) or (s == 0).any():
            raise InputError("normalisation mean/std must be finite and std must be non-zero")
        w0 = _to_numpy(self.weights[0])
        b0 = _to_numpy(self.biases[0])
        w_new = w0 / s[None, :]
        b_new = b0 - w_new @ m
        return self._replace(weights=[w_new, *self.weights[1:]], biases=[b_new, *self.biases[1:]], input_spec=spec)

    def with_outputs(self, C: np.ndarray) -> "Network":
        """The network ``x -> C f(x)``, with ``C`` of shape ``(m, n_H)`` folded into the last layer.

        With an output activation the selection cannot be folded into ``W[H-1]``; a linear layer ``C`` is appended
        instead and the old output layer becomes a hidden layer with that activation.
        """
        C = np.asarray(C, dtype=np.float64)
        if C.ndim != 2 or C.shape[1] != self.n_outputs:
            raise ShapeMismatchError(
                f"output selection of shape {C.shape} needs {self.n_outputs} columns (one per network output)"
            )
        if not np.isfinite(C).all():
            raise NonFiniteError("output selection matrix contains NaN or infinite values")
        if self.output_activation.is_identity:
            w = _fold_rows(C, _to_numpy(self.weights[-1]))
            b = _fold_rows(C, _to_numpy(self.biases[-1])[:, None])[:, 0]
            return self._replace(weights=[*self.weights[:-1], w], biases=[*self.biases[:-1], b])
        return self._replace(
            weights=[*self.weights, C],
            biases=[*self.biases, np.zeros(C.shape[0])],
            activations=[*self.activations, self.output_activation],
            output_activation=Identity(),
        )

    # -- evaluation --------------------------------------------------------------------------------------------
    def pre_activations(self, x: np.ndarray) -> list[np.ndarray]:
        """Exact float64 pre-activations ``z(1), ..., z(H)`` for a batch ``x`` of shape ``(batch, n_0)``."""
        x = self._as_batch(x)
        zs = []
        h = x
        for w, b, act in zip(self.weights, self.biases, self.layer_activations):
            z = h @ _to_numpy(w).T + _to_numpy(b)
            zs.append(z)
            h = act.value(z)
        return zs

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Exact float64 network output.

        Parameters
        ----------
        x : ndarray, shape (n_0,) or (batch, n_0)

        Returns
        -------
        ndarray, shape (n_H,) or (batch, n_H)
        """
        single = np.ndim(x) == 1
        zs = self.pre_activations(x)
        out = self.output_activation.value(zs[-1])
        return out[0] if single else out

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        """Exact analytic float64 Jacobian ``df/dx`` (right derivatives at activation kinks).

        Parameters
        ----------
        x : ndarray, shape (n_0,) or (batch, n_0)

        Returns
        -------
        ndarray, shape (n_H, n_0) or (batch, n_H, n_0)
        """
        single = np.ndim(x) == 1
        zs = self.pre_activations(x)
        ws = [_to_numpy(w) for w in self.weights]
        acts = self.layer_activations
        # Multiply from the output side: (batch, n_H, n_k) shrinks to the narrow side first.
        J = acts[-1].derivative(zs[-1])[:, :, None] * ws[-1][None, :, :]
        for k in range(self.n_layers - 2, -1, -1):
            J = (J * acts[k].derivative(zs[k])[:, None, :]) @ ws[k]
        return J[0] if single else J

    def _as_batch(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.n_inputs:
            raise ShapeMismatchError(f"input of shape {x.shape} does not match n_0 = {self.n_inputs}")
        return x

    # -- description -------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """JSON-able summary: widths, activations, parameter count, input metadata, provenance."""
        return {
            "widths": list(self.widths),
            "activations": [a.to_spec() for a in self.activations],
            "output_activation": self.output_activation.to_spec(),
            "n_parameters": self.n_parameters,
            "input": self.input_spec.to_dict(),
            "provenance": dict(self.provenance),
        }

    def __repr__(self) -> str:
        acts = ",".join(str(a) for a in self.activations)
        return f"Network(widths={'-'.join(map(str, self.widths))}, activations=[{acts}], output={self.output_activation})"
