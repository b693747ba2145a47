"""Train small MLPs (numpy only) and build He-initialised networks of the paper's shapes.

Used by ``scripts/train_mlp.py`` and to rebuild the bundled default model (:mod:`.default`) when it is missing.
Everything is seeded and reproducible: the same arguments give the same weights on the same machine (BLAS
summation order can differ between machines in the last bits).

- :func:`load_dataset` - scikit-learn's bundled 8x8 digits (pixels scaled to [0, 1]) or random data; a seeded
  train/test split.
- :func:`he_network` - He-normal weights ``N(0, 2 / n_in)`` and zero biases, generated in fixed blocks of
  :data:`GEN_ROWS` rows, each from ``SeedSequence([seed, layer, block])``: the values do not depend on chunking or
  on whether the network is built lazily (dask) or in memory, so paper-sized benchmark networks are generated
  block by block and written to a store without ever being held in memory.
- :func:`train_mlp` - minibatch Adam on the softmax cross-entropy, any registered activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..activations import Activation, get_activation
from ..errors import InputError, require
from .model import InputSpec, Network

__all__ = ["Dataset", "GEN_ROWS", "load_dataset", "he_network", "train_mlp", "accuracy", "parse_widths"]

GEN_ROWS = 256
"""Rows of a weight generated from one seed by :func:`he_network`."""


@dataclass(frozen=True)
class Dataset:
    """A classification data set, split.

    Attributes
    ----------
    x_train, x_test : ndarray, shape (n, n_0), float64 in [0, 1]
    y_train, y_test : ndarray, shape (n,), int64 labels in [0, n_classes)
    input_spec : InputSpec
        Input shape/layout and the domain box [0, 1].
    name : str
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_spec: InputSpec
    name: str
    n_classes: int


def parse_widths(text: str) -> tuple[int, ...]:
    """``"64-32-32-10"`` (or comma separated) -> ``(64, 32, 32, 10)``; at least two positive widths."""
    parts = [p for p in text.replace(",", "-").replace("x", "-").split("-") if p.strip()]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"widths {text!r} must be integers separated by '-', e.g. 64-32-32-10") from None
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise InputError(f"widths {text!r} need at least an input and an output width, all positive")
    return widths


def load_dataset(
    name: str = "digits",
    *,
    n_inputs: int | None = None,
    n_classes: int | None = None,
    n_samples: int = 1000,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Dataset:
    """Load and split a data set.

    Parameters
    ----------
    name : {"digits", "random"}
        ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, pixels 0..16 divided by 16, input
        shape (1, 8, 8), 10 classes; needs scikit-learn, the ``train`` extra).  ``random``: ``n_samples`` uniform
        inputs in [0, 1]^n_inputs with labels from a random linear map (for shapes without a data set).
    test_fraction : float
        Fraction held out, chosen by a permutation seeded with ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    if name == "digits":
        datasets = require("sklearn.datasets", "train")
        d = datasets.load_digits()
        x = np.asarray(d.data, dtype=np.float64) / 16.0
        y = np.asarray(d.target, dtype=np.int64)
        spec = InputSpec(shape=(1, 8, 8), layout="CHW", domain_lower=0.0, domain_upper=1.0)
        k = 10
        if n_inputs not in (None, 64) or n_classes not in (None, 10):
            raise InputError(
                f"the digits data set has 64 inputs and 10 classes; widths ask for {n_inputs} and {n_classes}"
            )
    elif name == "random":
        if n_inputs is None or n_classes is None:
            raise InputError("the random data set needs n_inputs and n_classes")
        x = rng.uniform(0.0, 1.0, size=(int(n_samples), int(n_inputs)))
        proj = rng.standard_normal((int(n_inputs), int(n_classes)))
        y = np.argmax((x - 0.5) @ proj, axis=1).astype(np.int64)
        spec = InputSpec(shape=(int(n_inputs),), layout="flat", domain_lower=0.0, domain_upper=1.0)
        k = int(n_classes)
    else:
        raise InputError(f"unknown data set {name!r}; choose digits or random")
    perm = rng.permutation(len(x))
    n_test = max(1, int(round(test_fraction * len(x))))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], spec, name, k)


def _he_block(seed: int, k: int, i: int, rows: int, n_in: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(k), int(i)]))
    return (rng.standard_normal((rows, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype, copy=False)


def he_network(
    widths: tuple[int, ...],
    activation: str | Activation = "relu",
    *,
    seed: int = 0,
    lazy: bool = False,
    dtype=np.float64,
    input_spec: InputSpec | None = None,
    provenance: dict | None = None,
) -> Network:
    """A network with He-normal weights ``W[k] ~ N(0, 2 / n_k)`` and zero biases (seeded, block-reproducible).

    Parameters
    ----------
    widths : tuple of int
        ``(n_0, ..., n_H)``.
    activation : str or Activation
        Activation of every hidden layer.
    lazy : bool
        Build dask arrays (generated block by block on compute) instead of numpy arrays; same values.
    """
    act = get_activation(activation)
    widths = tuple(int(w) for w in widths)
    weights, biases = [], []
    for k in range(len(widths) - 1):
        n_out, n_in = widths[k + 1], widths[k]
        starts = list(range(0, n_out, GEN_ROWS))
        if lazy:
            import dask.array as da
            from dask import delayed

            blocks = [
                da.from_delayed(
                    delayed(_he_block, pure=True)(seed, k, i, min(GEN_ROWS, n_out - r0), n_in, dtype),
                    shape=(min(GEN_ROWS, n_out - r0), n_in),
                    dtype=dtype,
                )
                for i, r0 in enumerate(starts)
            ]
            weights.append(da.concatenate(blocks, axis=0))
            biases.append(da.zeros((n_out,), dtype=dtype))
        else:
            weights.append(
                np.concatenate(
                    [_he_block(seed, k, i, min(GEN_ROWS, n_out - r0), n_in, dtype) for i, r0 in enumerate(starts)]
                )
            )
            biases.append(np.zeros(n_out, dtype=dtype))
    spec = input_spec if input_spec is not None else InputSpec(shape=(widths[0],), domain_lower=0.0, domain_upper=1.0)
    prov = {"source": "he_normal", "seed": int(seed), **(provenance or {})}
    return Network(weights, biases, [act] * (len(widths) - 2), input_spec=spec, provenance=prov)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(network: Network, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` (shape (n, n_0)) whose arg-max output equals the label ``y`` (shape (n,))."""
    return float(np.mean(np.argmax(network.forward(x), axis=1) == y))


def train_mlp(
    widths: tuple[int, ...],
    activation: str | Activation = "relu",
    *,
    data: Dataset,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[Network, dict]:
    """Train an MLP with minibatch Adam on the softmax cross-entropy (float64, numpy only).

    Parameters
    ----------
    widths : tuple of int
        ``(n_0, ..., n_H)``; ``n_0`` and ``n_H`` must match the data set.
    activation : str or Activation
        Hidden activation (any registered one).
    data : Dataset
    epochs : int
        Passes over the training set; ``0`` returns the He-initialised network.
    seed : int
        Seeds the initialisation (:func:`he_network`) and the minibatch order.

    Returns
    -------
    network : Network
        float64 weights; ``input_spec`` from the data set; ``provenance`` records the training settings and the
        accuracies.
    report : dict
        ``train_accuracy``, ``test_accuracy``, ``final_loss``.
    """
    widths = tuple(int(w) for w in widths)
    if widths[0] != data.x_train.shape[1]:
        raise InputError(f"input width {widths[0]} does not match the data set's {data.x_train.shape[1]} inputs")
    if widths[-1] != data.n_classes:
        raise InputError(f"output width {widths[-1]} does not match the data set's {data.n_classes} classes")
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise InputError("epochs must be >= 0, batch size >= 1 and the learning rate > 0")
    act = get_activation(activation)
    net0 = he_network(widths, act, seed=seed, input_spec=data.input_spec)
    params = [a.copy() for pair in zip(net0.weights, net0.biases) for a in pair]  # W0, b0, W1, b1, ...
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2, tiny = 0.9, 0.999, 1e-8
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    x, y = data.x_train, data.y_train
    n, H = len(x), len(widths) - 1
    step, loss = 0, float("nan")
    for _epoch in range(int(epochs)):
        order = rng.permutation(n)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            xb, yb = x[idx], y[idx]
            hs, zs = [xb], []
            for k in range(H):
                z = hs[-1] @ params[2 * k].T + params[2 * k + 1]
                zs.append(z)
                if k < H - 1:
                    hs.append(act.value(z))
            p = _softmax(zs[-1])
            loss = float(-np.mean(np.log(p[np.arange(len(yb)), yb] + 1e-300)))
            g = p
            g[np.arange(len(yb)), yb] -= 1.0
            g /= len(yb)
            grads = [None] * len(params)
            for k in range(H - 1, -1, -1):
                grads[2 * k] = g.T @ hs[k] + weight_decay * params[2 * k]
                grads[2 * k + 1] = g.sum(axis=0)
                if k > 0:
                    g = (g @ params[2 * k]) * act.derivative(zs[k - 1])
            step += 1
            for i, gr in enumerate(grads):
                m[i] = b1 * m[i] + (1 - b1) * gr
                v[i] = b2 * v[i] + (1 - b2) * gr * gr
                mh = m[i] / (1 - b1**step)
                vh = v[i] / (1 - b2**step)
                params[i] -= lr * mh / (np.sqrt(vh) + tiny)
    from .._version import __version__

    net = Network(params[0::2], params[1::2], [act] * (H - 1), input_spec=data.input_spec)
    report = {
        "train_accuracy": accuracy(net, data.x_train, data.y_train),
        "test_accuracy": accuracy(net, data.x_test, data.y_test),
        "final_loss": loss,
    }
    prov = {
        "source": "sklearn.datasets.load_digits" if data.name == "digits" else f"{data.name} data",
        "trainer": "recurjac_scale.network.train.train_mlp",
        "trainer_version": __version__,
        "dataset": data.name,
        "n_train": int(len(data.x_train)),
        "n_test": int(len(data.x_test)),
        "seed": int(seed),
        "epochs": int(epochs),
        "optimizer": "adam",
        "lr": float(lr),
        "batch_size": int(batch_size),
        "weight_decay": float(weight_decay),
        **report,
    }
    return Network(net.weights, net.biases, net.activations, input_spec=data.input_spec, provenance=prov), report
