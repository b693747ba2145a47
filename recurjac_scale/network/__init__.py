"""Network model, zarr model store and importers."""

from .model import InputSpec, Network

__all__ = ["InputSpec", "Network"]
