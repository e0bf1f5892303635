"""Run by test_communicator.py on two gloo processes whose collectives time out after 2 s: rank 0 builds the bank
from items that take 5 s to read, as from a slow disk, while rank 1 waits for it; writes ``patience<R>.json``."""

import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import relict_callbacks as rc
from relict_callbacks.monitor import Monitor, communicator
from relict_callbacks.monitor.communicator import current_communicator


class SlowDisk(torch.utils.data.Dataset):
    """20 phantoms, 0.25 s to read each."""

    def __init__(self) -> None:
        self.items = rc.data.make_phantoms(20, ndim=2, size=16)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        time.sleep(0.25)
        return self.items[index]


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    communicator.HEARTBEAT_SECONDS = 0.5  # within the 2 s timeout, as 60 s is within NCCL's 10 minutes
    comm = current_communicator()
    monitor = Monitor(levels=[rc.VoxelLevel(grid=16, max_bend=0)], num_samples=2, progress=False)  # a quick null
    start = time.monotonic()
    monitor.prepare(SlowDisk(), comm=comm)
    seen = {"image_shape": monitor.image_shape, "seconds": time.monotonic() - start}
    (Path(sys.argv[1]) / f"patience{comm.rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()
