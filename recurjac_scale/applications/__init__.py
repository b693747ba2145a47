"""Applications of the Jacobian bounds as batch jobs: certified robustness radii (Theorem 2), the landscape
radius ``R*`` (Figure 2), Lipschitz sweeps over radii (Figures 1, 3), and a PGD attack to check them against."""

from .attack import AttackResult, attack_radius, pgd_attack
from .certify import SEARCHES, TARGETS, CertifyResult, certify, integral_radius, margin_bound_radius
from .landscape import LandscapeResult, landscape_radius
from .sweeps import SweepResult, lipschitz_sweep, log_eps_grid

__all__ = [
    "AttackResult",
    "CertifyResult",
    "LandscapeResult",
    "SweepResult",
    "SEARCHES",
    "TARGETS",
    "attack_radius",
    "certify",
    "integral_radius",
    "landscape_radius",
    "lipschitz_sweep",
    "log_eps_grid",
    "margin_bound_radius",
    "pgd_attack",
]
