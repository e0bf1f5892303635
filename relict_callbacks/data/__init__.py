"""Synthetic patients (head CT with hemorrhage, TOF-MRA vessel trees) and their replicas, for tests and demos."""

from .phantoms import DISTORTIONS, HARD_PERTURBATIONS, LR_AXIS, PERTURBATIONS, make_phantoms, make_replica

__all__ = ["DISTORTIONS", "HARD_PERTURBATIONS", "LR_AXIS", "PERTURBATIONS", "make_phantoms", "make_replica"]
