"""How the processes of a distributed run talk during a check: rank, world size, any-failed, gather, broadcast.

The base class is the single-process case (every call returns its input); an adapter passes a subclass that
speaks its framework's collectives (e.g. the Lightning strategy), like torchmetrics' injectable ``dist_sync_fn``.

>>> import torch
>>> single = Communicator()
>>> single.rank, single.world_size, single.any(False), single.gather(torch.ones(2, 1)).shape
(0, 1, False, torch.Size([2, 1]))
"""

from __future__ import annotations

import torch


class Communicator:
    """One process: rank 0 of 1. Subclasses override every method for distributed runs; all ranks call each."""

    rank = 0
    world_size = 1

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process."""
        return flag

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (same shape on all), concatenated along dim 0 in rank order, on the CPU."""
        return tensor

    def broadcast(self, value):
        """Rank 0's ``value`` (picklable), on every process."""
        return value
