"""Phantom patients (head CT with hemorrhage, TOF-MRA-like vessels) and a replica maker."""

from .phantoms import LR_AXIS, PERTURBATIONS, make_phantoms, make_replica

__all__ = ["make_phantoms", "make_replica", "PERTURBATIONS", "LR_AXIS"]
