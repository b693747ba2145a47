"""The bundled default model: a 64-32-32-10 ReLU MLP trained on scikit-learn's 8x8 digits.

It ships inside the package (``recurjac_scale/data/default_model.zarr``, a model store as in
:mod:`recurjac_scale.network.store`) with five held-out test digits (``recurjac_scale/data/default_inputs.npy``,
shape (5, 64), pixels in [0, 1]), so the README's commands need no download.  Both were produced by::

    python scripts/train_mlp.py --widths 64-32-32-10 --activation relu --epochs 100 --lr 1e-3 --seed 0 \\
        -o recurjac_scale/data/default_model.zarr --inputs-out recurjac_scale/data/default_inputs.npy

If the bundled files are missing (e.g. a stripped install), :func:`default_model_path` trains the same model
(:data:`DEFAULT_TRAINING`, about a second; needs scikit-learn for the data) into a user cache folder
(``$RECURJAC_SCALE_CACHE``, else ``$XDG_CACHE_HOME/recurjac-scale``, else ``~/.cache/recurjac-scale``) and returns
that.  The rebuilt weights equal the bundled ones up to BLAS rounding differences between machines.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import OutputExistsError

__all__ = [
    "DEFAULT_TRAINING",
    "N_DEFAULT_INPUTS",
    "build_default_model",
    "cache_dir",
    "default_inputs",
    "default_inputs_path",
    "default_model_path",
]

DEFAULT_TRAINING = dict(widths=(64, 32, 32, 10), activation="relu", epochs=100, lr=1e-3, seed=0, batch_size=32)
"""Settings of the bundled default model (arguments of :func:`recurjac_scale.network.train.train_mlp`)."""

N_DEFAULT_INPUTS = 5
_MODEL_NAME = "default_model.zarr"
_INPUTS_NAME = "default_inputs.npy"


def _bundled(name: str) -> Path | None:
    try:
        p = Path(str(resources.files("recurjac_scale") / "data" / name))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual installs
        return None
    return p if p.exists() else None


def cache_dir() -> Path:
    """The user cache folder for rebuilt default files (created on demand)."""
    env = os.environ.get("RECURJAC_SCALE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "recurjac-scale"


def build_default_model(model_path: str | os.PathLike, inputs_path: str | os.PathLike | None = None, *,
                        overwrite: bool = False) -> dict:
    """Train the default model (:data:`DEFAULT_TRAINING`) and save it as a model store.

    Parameters
    ----------
    model_path : path
        Store to write.
    inputs_path : path, optional
        Where to save the first :data:`N_DEFAULT_INPUTS` held-out digits as ``.npy`` (shape (5, 64), float64).
    overwrite : bool
        Replace existing outputs.

    Returns
    -------
    dict
        The training report (``train_accuracy``, ``test_accuracy``, ``final_loss``).
    """
    from .store import save_network
    from .train import load_dataset, train_mlp

    cfg = dict(DEFAULT_TRAINING)
    data = load_dataset("digits", seed=cfg["seed"])
    net, report = train_mlp(
        cfg.pop("widths"), cfg.pop("activation"), data=data, **cfg
    )
    net.provenance["trainer"] = "scripts/train_mlp.py"
    net.provenance["example_inputs"] = f"first {N_DEFAULT_INPUTS} held-out inputs, labels " + ",".join(
        str(int(v)) for v in data.y_test[:N_DEFAULT_INPUTS]
    )
    if inputs_path is not None:
        inputs_path = Path(inputs_path)
        if inputs_path.exists() and not overwrite:
            raise OutputExistsError(f"{str(inputs_path)!r} already exists")
        np.save(inputs_path, np.ascontiguousarray(data.x_test[:N_DEFAULT_INPUTS]))
    save_network(net, model_path, overwrite=overwrite)
    return report


def _ensure_cached() -> tuple[Path, Path]:
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    model, inputs = d / _MODEL_NAME, d / _INPUTS_NAME
    if not (model / "zarr.json").is_file() or not inputs.is_file():
        tmp_inputs = d / f".{_INPUTS_NAME}.{os.getpid()}.npy"
        try:
            build_default_model(model, tmp_inputs, overwrite=True)
            os.replace(tmp_inputs, inputs)
        except OutputExistsError:  # pragma: no cover - another process finished first
            pass
        finally:
            tmp_inputs.unlink(missing_ok=True)
    return model, inputs


def default_model_path() -> Path:
    """Path of the bundled default model store (built into the user cache folder if it is missing)."""
    p = _bundled(_MODEL_NAME)
    if p is not None and (p / "zarr.json").is_file():
        return p
    return _ensure_cached()[0]


def default_inputs_path() -> Path:
    """Path of the default model's test inputs (``.npy``, shape (5, 64), in [0, 1])."""
    p = _bundled(_INPUTS_NAME)
    if p is not None:
        return p
    return _ensure_cached()[1]


def default_inputs() -> np.ndarray:
    """The default model's test inputs, shape (5, 64), float64 in [0, 1]."""
    return np.load(default_inputs_path(), allow_pickle=False)
