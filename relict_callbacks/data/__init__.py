"""Synthetic patients (head CT with hemorrhage, TOF-MRA vessel trees) and their replicas, for tests and demos."""

from .phantoms import HARD_PERTURBATIONS, LR_AXIS, PERTURBATIONS, make_phantoms, make_replica

__all__ = ["HARD_PERTURBATIONS", "LR_AXIS", "PERTURBATIONS", "make_phantoms", "make_replica"]
