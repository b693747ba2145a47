"""Anytime, distributed branch-and-bound for the local Lipschitz constant of one output (issue: tighter than the
Jacobian bound methods alone).  :func:`bab_lipschitz` is the entry point; :mod:`.parts` says what a part is and
how it is bounded and split, :mod:`.search` runs the search, :mod:`.attack` finds the lower bound."""

from .attack import gradient_norm_attack, region_walk
from .parts import BabProblem, bound_part, split_part
from .search import BabResult, bab_lipschitz

__all__ = [
    "BabProblem", "BabResult", "bab_lipschitz", "bound_part", "gradient_norm_attack", "region_walk", "split_part",
]
