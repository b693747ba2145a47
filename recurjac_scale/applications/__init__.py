"""Applications of the Jacobian bounds as batch jobs: certified robustness radii (Theorem 2), the landscape
radius ``R*`` (Figure 2), Lipschitz sweeps over radii (Figures 1, 3), and a PGD attack to check them against."""

from .attack import AttackResult, attack_radius, pgd_attack
from .certify import SEARCHES, TARGETS, CertifyResult, certify, integral_radius, margin_bound_radius

__all__ = [
    "AttackResult",
    "CertifyResult",
    "SEARCHES",
    "TARGETS",
    "attack_radius",
    "certify",
    "integral_radius",
    "margin_bound_radius",
    "pgd_attack",
]
