"""One error hierarchy for the whole package.

Every error the library raises on bad input is a :class:`RecurJacError` (a ``ValueError``), so a caller can catch
one class, and the command line turns any of them into a one-line message and a non-zero exit.  Messages say
what was wrong, with which value, and what would be accepted.
"""

from __future__ import annotations

__all__ = [
    "RecurJacError",
    "UnsupportedActivationError",
    "ShapeMismatchError",
    "NonFiniteError",
    "ModelFormatError",
    "StoreError",
    "IncompleteRunError",
    "InputError",
    "EmptyRegionError",
    "OutputExistsError",
    "MissingDependencyError",
    "ClusterError",
    "IncompleteRunError",
    "IntegrityError",
]


class RecurJacError(ValueError):
    """Base class of every error raised on invalid input or data."""


class UnsupportedActivationError(RecurJacError):
    """An activation is unknown, or violates Assumption 2 of Zhang et al. (2019) (0 <= sigma' <= C)."""


class ShapeMismatchError(RecurJacError):
    """Arrays whose shapes do not chain (weights, biases, inputs, output selections)."""


class NonFiniteError(RecurJacError):
    """NaN or infinite values where finite numbers are required (weights, biases, inputs)."""


class ModelFormatError(RecurJacError):
    """A model file that cannot be read or holds an unsupported construct."""


class StoreError(RecurJacError):
    """A zarr model or result store that is missing, incomplete, inconsistent or of an unknown format version."""


class InputError(RecurJacError):
    """A bad argument value: negative eps, unknown norm, an input outside the declared domain, and the like."""


class EmptyRegionError(InputError):
    """Known bounds given for a region (``clip=``) contradict each other: the region is empty (for example a
    branch-and-bound part whose split constraints cannot all hold)."""


class OutputExistsError(RecurJacError):
    """An output already exists and overwriting it was not requested."""


class ClusterError(RecurJacError):
    """A dask scheduler that cannot be reached (or does not answer) within the connection timeout."""


class IntegrityError(StoreError):
    """Stored data whose SHA-256 checksum does not match its record: it was damaged or edited, and is not used."""


class IncompleteRunError(RecurJacError, RuntimeError):
    """A run stopped before every block was computed (``max_blocks`` reached, an I/O error such as a full disk, or
    an interruption: then the ``KeyboardInterrupt`` carries one as its ``incomplete`` attribute).  No result is
    presented; the finished blocks stay in the checkpoint and a rerun of the same job continues from them.

    Attributes
    ----------
    checkpoint : str or None
        The folder holding the finished blocks (rerun the same command to continue), if it was kept.
    done, total : int
        Blocks finished so far, and blocks of the whole job.
    """

    def __init__(self, message: str, *, checkpoint=None, done: int = 0, total: int = 0):
        super().__init__(message)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.done = int(done)
        self.total = int(total)


class MissingDependencyError(RecurJacError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require(module: str, extra: str):
    """Import an optional dependency lazily.

    Parameters
    ----------
    module : str
        Module name, e.g. ``"onnx"``.
    extra : str
        The ``pip install recurjac-scale[extra]`` extra that provides it.

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    MissingDependencyError
        If the module cannot be imported.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"optional dependency {module!r} is not installed ({exc}); "
            f"install it with: pip install 'recurjac-scale[{extra}]'"
        ) from exc
