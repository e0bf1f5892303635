"""How the processes of a distributed run talk during a check: rank, world size, who failed, gather, broadcast.

A communicator is injected into :meth:`~relict_callbacks.monitor.Monitor.check`, like torchmetrics' ``dist_sync_fn``:
the base class is the single process (every call returns its input), :class:`DistributedCommunicator` speaks plain
``torch.distributed`` (``torchrun``, ignite ``idist``, MONAI), and an adapter may pass its framework's collectives
(the Lightning callback uses its strategy's). A subclass sets ``rank`` and ``world_size`` and overrides the two
primitives :meth:`~Communicator.all_gather` and :meth:`~Communicator.broadcast`; the rest is built on them.
Every process calls each method together, in the same order.

>>> import torch
>>> single = Communicator()
>>> single.rank, single.world_size, single.ranks_where(True), single.gather(torch.ones(2, 1)).shape
(0, 1, [0], torch.Size([2, 1]))
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from ..heartbeat import beating

HEARTBEAT_SECONDS = 60.0  # rank 0, working alone, tells the waiting processes so at most this often
STILL_WORKING = "relict: rank 0 is still working"
GATHER_BYTES = 256 * 2**20  # rows a process sends per all-gather; each process receives world size times that


class Communicator:
    """One process: rank 0 of 1."""

    rank = 0
    world_size = 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (the same shape and dtype on all), stacked in rank order: ``[world_size, *]``."""
        return tensor.unsqueeze(0)

    def broadcast(self, value):
        """Rank 0's ``value`` (picklable), on every process."""
        return value

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks of the processes whose ``flag`` is true, e.g. those whose sampler failed."""
        return self.all_gather(torch.tensor([int(flag)])).flatten().nonzero().flatten().tolist()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along dim 0 in rank order, on the CPU. Dim 0 may differ between
        processes (the tensors travel padded to the longest and are trimmed); the other dims may not. They travel
        :data:`GATHER_BYTES` of rows a process at a time, each part on the CPU before the next is sent: an
        all-gather puts every process's rows on every process (on the GPU, under NCCL)."""
        if self.world_size == 1:
            return tensor
        shapes = self.all_gather(torch.tensor(tensor.shape)).cpu()
        if (shapes[:, 1:] != shapes[:1, 1:]).any():
            raise ValueError(f"cannot gather tensors whose shapes differ beyond dim 0: {shapes.tolist()} by rank")
        rows, row_bytes = shapes[:, 0].tolist(), math.prod(tensor.shape[1:]) * tensor.element_size()
        if max(rows) == 0:
            return tensor.new_zeros(0, *tensor.shape[1:])
        step = max(1, GATHER_BYTES // max(row_bytes, 1))  # the same on every process: only dim 0 differs
        padded = tensor.new_zeros(max(rows), *tensor.shape[1:])
        padded[: len(tensor)] = tensor
        gathered = torch.cat([self.all_gather(padded[start : start + step]).cpu()  # [world, rows, ...]
                              for start in range(0, max(rows), step)], dim=1)
        return torch.cat([part[:count] for part, count in zip(gathered, rows)])

    def from_rank_zero(self, function):
        """``function()`` run on rank 0 only; its (picklable) result on every process. If it raises, rank 0 raises
        that error and the others a ``RuntimeError`` quoting it, so no process waits for an answer forever.

        While it runs, rank 0 tells the others at most every :data:`HEARTBEAT_SECONDS` that it is still working
        (at each :func:`~relict_callbacks.heartbeat.beat` of the work: items read, batches searched), so that no
        process waits in one collective past its backend's timeout, however long the work takes."""
        if self.world_size == 1:
            return function()
        failure = result = None
        if self.rank == 0:
            last = time.monotonic()

            def still_working() -> None:
                nonlocal last
                if time.monotonic() - last >= HEARTBEAT_SECONDS:
                    self.broadcast(STILL_WORKING)
                    last = time.monotonic()

            try:
                with beating(still_working):
                    result = function()
            except Exception as error:
                failure = error
            answer = self.broadcast((None if failure is None else f"{type(failure).__name__}: {failure}", result))
        else:
            answer = self.broadcast(None)
            while isinstance(answer, str) and answer == STILL_WORKING:
                answer = self.broadcast(None)
        message, result = answer
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"rank 0 failed: {message}")
        return result


class DistributedCommunicator(Communicator):
    """The processes of ``torch.distributed``'s default group; tensors travel on the GPU for NCCL (``device``, this
    process's CUDA device, e.g. a MONAI engine's ``cuda:<local rank>``, which a script need not make current; else
    the current one), else on the CPU."""

    def __init__(self, device=None) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        device = None if device is None else torch.device(device)
        if dist.get_backend() != "nccl":
            self.device = torch.device("cpu")
        elif device is not None and device.type == "cuda" and device.index is not None:
            self.device = device
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device).contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def broadcast(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)  # NCCL: this process's GPU, not the current one
        return box[0]


SINGLE_PROCESS = Communicator()


def current_communicator(device=None) -> Communicator:
    """:class:`DistributedCommunicator` (on ``device``) while ``torch.distributed`` runs several processes, else the
    single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedCommunicator(device)
    return SINGLE_PROCESS
