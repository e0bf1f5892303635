"""Run by test_communicator.py on two processes (``torchrun``'s environment, gloo): each rank exercises the
``DistributedCommunicator``, and ``Monitor.check`` through it without any training framework, and writes what it
got to ``rank<R>.json``."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from faults import failing
from monai.data import Dataset

import relict_callbacks as rc
from relict_callbacks.monitor import Monitor
from relict_callbacks.monitor import communicator
from relict_callbacks.monitor.communicator import current_communicator


def copier(fails_here: bool = False):
    """A sampler returning training images; it raises at every call where ``fails_here``."""
    images = torch.stack([torch.as_tensor(item["image"]) for item in TRAIN])
    return failing(at_call=None, here=fails_here, sampler=lambda model, n, generator: images[:n])


def check(comm, **options) -> dict:
    monitor = Monitor(levels=[rc.VoxelLevel()], num_samples=3, alpha=0.1, max_replica_rate=0.3, progress=False,
                      **options)  # 3 of 3 copies: lower bound 0.37 > 0.3, memorization detected
    monitor.prepare(TRAIN, comm=comm)
    done = monitor.check(None, epoch=0, step=7, comm=comm)
    return {"history": monitor.history, "stop": done.stop_reason.name, "stop_state": monitor.stop.state_dict(),
            "has_bank": monitor.bank is not None, "has_report": done.report is not None}


def gathered_row_by_row(comm, tensor: torch.Tensor) -> torch.Tensor:
    """``comm.gather`` with room for one row a process per all-gather."""
    kept, communicator.GATHER_BYTES = communicator.GATHER_BYTES, tensor[0].numel() * tensor.element_size()
    try:
        return comm.gather(tensor)
    finally:
        communicator.GATHER_BYTES = kept


def seeds_drawn(comm) -> list[int]:
    """The seeds of a check's sampler calls, one sample a call, after preparing twice (a second fit)."""
    seeds = []

    def sampler(model, n, generator):
        seeds.append(generator.initial_seed())
        return torch.rand(n, 1, 16, 16, generator=generator)

    monitor = Monitor(levels=[rc.VoxelLevel()], num_samples=4, sample_batch_size=1, sampler=sampler, alpha=0.1,
                      progress=False)
    monitor.prepare(TRAIN, comm=comm)
    monitor.prepare(TRAIN, comm=comm)  # rank 0 holds the bank now, the others not: the same collectives on all
    assert monitor.check(None, epoch=0, step=0, comm=comm).ok
    return seeds


def outcome(call) -> str:
    try:
        return repr(call())
    except Exception as error:
        return f"{type(error).__name__}: {error}"


TRAIN = rc.data.make_phantoms(8, ndim=2, size=16)

if __name__ == "__main__":
    dist.init_process_group("gloo")
    comm = current_communicator()
    rank = comm.rank
    seen = {
        "kind": type(comm).__name__, "rank": rank, "world_size": comm.world_size,
        "gather": comm.gather(torch.full((3 - rank, 2), rank)).tolist(),  # 3 rows from rank 0, 2 from rank 1
        "gather_row_by_row": gathered_row_by_row(comm, torch.full((3 - rank, 2), rank)).tolist(),
        "ranks_where": comm.ranks_where(rank == 1),
        "broadcast": comm.broadcast({"from": rank}),
        "mismatch": outcome(lambda: comm.gather(torch.zeros(1, 2 + rank))),
        "from_rank_zero": outcome(lambda: comm.from_rank_zero(lambda: f"built on {rank}")),
        "rank_zero_fails": outcome(lambda: comm.from_rank_zero(lambda: 1 / 0)),
        "too_few_samples": outcome(lambda: Monitor(levels=[rc.VoxelLevel()], num_samples=1).prepare(comm=comm)),
        "partitioned": outcome(lambda: Monitor(levels=[rc.VoxelLevel()], num_samples=2).prepare(
            Dataset([{"image": f"patient{i}.nii.gz"} for i in range(rank, 8, 2)]), comm=comm)),  # a half each
        "check": check(comm, sampler=copier()),
        "seeds": seeds_drawn(comm),
        "failed_check": check(comm, sampler=copier(fails_here=rank == 1))["history"],
        "strict": outcome(lambda: check(comm, sampler=copier(fails_here=rank == 1), strict=True)),
    }
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()
