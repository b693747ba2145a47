"""The ``recurjac-scale`` command line: the only place that parses arguments and prints.

Each subcommand lives in its own module of this package, which defines ``register(subparsers)``: it adds its
parser and sets ``func`` (called with the parsed namespace, returning an exit code).  Errors: usage errors exit 2
(argparse), invalid data exits 1 with one line on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import RecurJacError

__all__ = ["main", "build_parser"]

# Subcommand modules, in the order they appear in --help.
COMMAND_MODULES = (
    "import_model",
    "info",
    "layer_bounds",
    "bounds",
    "lipschitz",
    "certify",
    "landscape",
    "plan",
    "run",
    "bab",
)


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="recurjac-scale",
        description=(
            "Certified element-wise bounds on a neural network's input Jacobian (RecurJac, Zhang et al. 2019), "
            "local and global Lipschitz constants from them, and the pre-activation bounds they rest on. "
            "MODEL is a zarr model store written by 'recurjac-scale import', or 'default' for the bundled model."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recurjac-scale`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RecurJacError as exc:
        if args.debug:
            raise
        print(f"recurjac-scale {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # stdout was closed early (e.g. piped into `head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, MemoryError) as exc:
        if args.debug:
            raise
        print(f"recurjac-scale {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"recurjac-scale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
