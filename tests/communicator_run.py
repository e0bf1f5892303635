"""Run by test_communicator.py on two processes (``torchrun``'s environment, gloo): each rank exercises the
``DistributedCommunicator`` and writes what it got to ``rank<R>.json``."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import relict_callbacks as rc
from relict_callbacks.monitor import Monitor
from relict_callbacks.monitor.communicator import current_communicator


def outcome(call) -> str:
    try:
        return repr(call())
    except Exception as error:
        return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    dist.init_process_group("gloo")
    comm = current_communicator()
    rank = comm.rank
    seen = {
        "kind": type(comm).__name__, "rank": rank, "world_size": comm.world_size,
        "gather": comm.gather(torch.full((3 - rank, 2), rank)).tolist(),  # 3 rows from rank 0, 2 from rank 1
        "ranks_where": comm.ranks_where(rank == 1),
        "broadcast": comm.broadcast({"from": rank}),
        "mismatch": outcome(lambda: comm.gather(torch.zeros(1, 2 + rank))),
        "from_rank_zero": outcome(lambda: comm.from_rank_zero(lambda: f"built on {rank}")),
        "rank_zero_fails": outcome(lambda: comm.from_rank_zero(lambda: 1 / 0)),
        "too_few_samples": outcome(lambda: Monitor(levels=[rc.VoxelLevel()], num_samples=1).prepare(comm=comm)),
    }
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()
