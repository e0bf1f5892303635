"""Run by test_lightning_ddp.py: a 2-process DDP (gloo, CPU) fit with ReplicaMonitor; each rank writes what it saw.

Rank 1's sampler fails at the second check. Each rank has its own ``save_dir`` (``relict-rank<R>``; Lightning starts
rank 1 as a copy of this script with ``LOCAL_RANK=1``), so the test can tell who wrote files."""

import json
import os
import sys
from pathlib import Path

from faults import failing
from lightning_models import TurnsCopier, loader, phantoms, trainer

import relict_callbacks as rc
from relict_callbacks.integrations.lightning import ReplicaMonitor


if __name__ == "__main__":
    out, rank = Path(sys.argv[1]), int(os.environ.get("LOCAL_RANK", 0))
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], sampler=failing(at_call=1, here=rank == 1), num_samples=5,
                             alpha=0.1, max_replica_rate=0.5, save_dir=out / f"relict-rank{rank}", progress=False)
    fit = trainer(out, 10, [monitor], strategy="ddp", devices=2, logger=False)
    fit.fit(TurnsCopier(train, copy_from=2), loader(train, batch_size=2))
    result = {"epoch": fit.current_epoch, "history": monitor.history, "reason": monitor.stopping_reason.name,
              "bank_size": len(monitor.monitor.bank) if monitor.monitor.bank is not None else None}
    (out / f"rank{fit.global_rank}.json").write_text(json.dumps(result))
