"""The package version (one place; modules import it from here, not from the package root)."""

__version__ = "0.1.0"
