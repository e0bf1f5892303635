"""What ``Monitor.safe_checkpoint()`` costs when the checkpoint files are unchanged since its last call (their steps
remembered by mtime, size and inode), as a ratio against reading every file again (as before, on every call),
measured in the same run on the same files.

    python benchmarks/checkpoint_scan.py [--files 20] [--megabytes 50] [--calls 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from relict_callbacks import VoxelLevel
from relict_callbacks.monitor import Monitor, checkpoints
from relict_callbacks.monitor.ledger import Check


def timed(call, calls: int, forget: bool) -> float:
    """Seconds per call of ``call()``; ``forget``: every file is read again on each call."""
    start = time.perf_counter()
    for _ in range(calls):
        if forget:
            checkpoints._known.clear()
        call()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        measure(folder, args.files, args.megabytes, args.calls)


def measure(folder: str, files: int, megabytes: int, calls: int) -> None:
    weights = {"weight": torch.zeros(megabytes * 2**18)}  # float32
    minute_ago = time.time_ns() - 60 * 10**9
    monitor = Monitor(levels=[VoxelLevel()], max_replica_rate=0.1, checkpoint_dirs=[folder])
    for epoch in range(files):
        path = os.path.join(folder, f"epoch={epoch}.ckpt")
        torch.save({"global_step": 10 * (epoch + 1), "state_dict": weights}, path)
        os.utime(path, ns=(minute_ago, minute_ago))  # not just written: its step may be remembered
        monitor.ledger.record(Check(epoch, 10 * (epoch + 1), {"relict/replica_rate": 0.0, "relict/replica_rate_low":
                                                              0.0, "relict/replica_rate_high": 0.05}, num_samples=60))
    monitor.safe_checkpoint()
    again = timed(monitor.safe_checkpoint, calls, forget=True)
    remembered = timed(monitor.safe_checkpoint, calls, forget=False)
    print(f"safe_checkpoint() over {files} files of {megabytes} MB: reading every file "
          f"{1000 * again:7.2f} ms, unchanged files remembered {1000 * remembered:7.2f} ms ({remembered / again:.3f}x)")


if __name__ == "__main__":
    main()
