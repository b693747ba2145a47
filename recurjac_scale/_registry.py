"""One small registry type for every registry of the package (activations, layer-bound methods, Jacobian methods,
model importers).

A :class:`Registry` is a ``dict`` (name -> entry) that also knows how to normalise a name a user typed
(``" ReLU "``, ``"recurjac_b"``) and its aliases (``"f0"`` -> ``"recurjac-f0"``), and raises one error naming the
accepted entries.  It stays a plain mapping for readers (``sorted(JACOBIAN_METHODS)``, ``name in ACTIVATIONS``).
"""

from __future__ import annotations

from typing import Any, Iterable

from .errors import InputError

__all__ = ["Registry"]


class Registry(dict):
    """A name -> entry mapping with name normalisation and aliases.

    Parameters
    ----------
    what : str
        What the entries are ("Jacobian method"), for error messages.
    sep : {"-", "_"}
        The word separator of the canonical names: the other one is accepted for it (``recurjac_b`` ->
        ``recurjac-b`` with ``sep="-"``).
    error : type
        Exception raised by :meth:`get` for an unknown name (a :class:`~recurjac_scale.errors.RecurJacError`).

    Notes
    -----
    A name is normalised by :meth:`key` (stripped, lower case, the other separator replaced by ``sep``), then
    looked up among the aliases, first without any separator (``leakyrelu``), then as it is.
    """

    def __init__(self, what: str, *, sep: str = "-", error: type = InputError):
        super().__init__()
        if sep not in ("-", "_"):
            raise ValueError(f"sep={sep!r}; accepted: '-' or '_'")
        self.what = what
        self.sep = sep
        self.error = error
        self.aliases: dict[str, str] = {}

    def key(self, name: Any) -> str:
        """``name`` normalised: stripped, lower case, with ``sep`` as word separator."""
        other = "_" if self.sep == "-" else "-"
        return str(name).strip().lower().replace(other, self.sep)

    def resolve(self, name: Any) -> str:
        """The canonical key of ``name`` (aliases applied); not checked for registration."""
        k = self.key(name)
        return self.aliases.get(k.replace(self.sep, ""), self.aliases.get(k, k))

    def register(self, name: str, entry: Any, aliases: Iterable[str] = ()) -> Any:
        """Register ``entry`` under ``name`` (normalised) and the given aliases; returns ``entry``."""
        k = self.key(name)
        self[k] = entry
        self.add_aliases({a: k for a in aliases})
        return entry

    def add_aliases(self, aliases: dict[str, str]) -> None:
        """Add ``alias -> canonical name`` pairs (both normalised)."""
        for a, target in aliases.items():
            self.aliases[self.key(a)] = self.key(target)

    def accepted(self) -> str:
        """The registered names, sorted, comma separated (for messages)."""
        return ", ".join(sorted(self))

    def lookup(self, name: Any) -> Any:
        """The entry of ``name`` (normalised, aliases accepted).  (``dict.get`` keeps its plain meaning.)

        Raises
        ------
        RecurJacError
            (:attr:`error`) for an unknown name, listing the accepted ones.
        """
        k = self.resolve(name)
        if k in self:
            return self[k]
        raise self.error(f"unknown {self.what} {name!r}; accepted: {self.accepted()}")
