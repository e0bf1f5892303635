"""Run by test_monai_ddp.py as ``torchrun`` would (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` ... in the environment of
each of two processes): a gloo (CPU) MONAI ``SupervisedTrainer`` started with ignite ``idist``, its
network wrapped in ``DistributedDataParallel`` and its data sharded by a ``DistributedSampler``, as MONAI users
train; ``ReplicaMonitorHandler`` and a ``CheckpointSaver`` keyed on ``relict/replica_rate``. Rank 1's sampler fails at
the second check. Each rank writes what it saw to ``rank<R>.json`` and has its own ``save_dir`` (``relict-rank<R>``),
so the test can tell who wrote files."""

import json
import sys
from pathlib import Path

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from faults import failing
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver
from monai_engines import TurnsCopier, phantoms

import relict_callbacks as rc
from relict_callbacks.integrations.monai import ReplicaMonitorHandler


def train(local_rank: int, out: Path) -> None:
    torch.set_num_threads(1)
    rank, items = idist.get_rank(), phantoms(8)
    copier = TurnsCopier(items, copy_from=2)
    sampler = failing(at_call=1, here=rank == 1)  # gets the network unwrapped from DDP; rank 1 fails at check 2
    network = torch.nn.parallel.DistributedDataParallel(copier)
    data = torch.utils.data.DataLoader(items, batch_size=2, sampler=torch.utils.data.DistributedSampler(items))
    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], sampler=sampler, num_samples=5, alpha=0.1,
                                   max_replica_rate=0.5, save_dir=out / f"relict-rank{rank}",
                                   checkpoint_dirs=[out / "ckpt"], progress=False)
    trainer = SupervisedTrainer(device="cpu", max_epochs=6, train_data_loader=data, network=network,
                                optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
                                loss_function=lambda pred, label: F.mse_loss(pred, label.float()),
                                train_handlers=[relict])
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: setattr(copier, "epoch", engine.state.epoch - 1))
    CheckpointSaver(str(out / "ckpt"), {"net": network, "relict": relict}, save_key_metric=True,
                    key_metric_name="relict/replica_rate", key_metric_negative_sign=True).attach(trainer)
    trainer.run()
    result = {"epoch": trainer.state.epoch, "stopped_epoch": relict.stopped_epoch, "history": relict.history,
              "reason": relict.stopping_reason.name, "safe": relict.safe_checkpoint(),
              "bank_size": None if relict.monitor.bank is None else len(relict.monitor.bank),
              "metrics": {k: v for k, v in trainer.state.metrics.items() if k.startswith("relict/")}}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    with idist.Parallel(backend="gloo") as run:
        run.run(train, Path(sys.argv[1]))
