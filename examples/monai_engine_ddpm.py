"""Watch a MONAI engine's diffusion model for copies of its training patients, while it trains.

A small MONAI ``DiffusionModelUNet`` (DDPM) is trained by a plain MONAI ``SupervisedTrainer`` (``DiffusionInferer``
as its inferer, ``DiffusionPrepareBatch`` drawing the noise and timesteps) on a handful of 2D phantom head CTs.
``ReplicaMonitorHandler`` samples it every few epochs with the same DDIM noise, scores the samples against a
reference bank of the training set (calibrated on unseen phantom patients), writes the replica metrics into
``engine.state.metrics`` and terminates the engine once most samples are copies. A ``CheckpointSaver`` keyed on
``relict/replica_rate`` keeps the checkpoint with the lowest replica rate, and the handler's ``state_dict`` goes
into it, so ``CheckpointLoader`` resumes the monitor too, and the file says which engine step it holds: the handler
finds the saver's folder by itself and names a file safe only if it holds a step certified (upper bound of the
replica rate <= the limit) before memorization was detected (lower bound above the limit).

Run it with ``python examples/monai_engine_ddpm.py --out relict_monai`` (about 10 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ignite.metrics import Average
from monai.engines import SupervisedTrainer
from monai.engines.utils import DiffusionPrepareBatch
from monai.handlers import CheckpointSaver, from_engine
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from relict_callbacks import VoxelLevel
from relict_callbacks.data import make_phantoms
from relict_callbacks.integrations.monai import ReplicaMonitorHandler
from relict_callbacks.integrations.samplers import DiffusionSampler

TIMESTEPS = 1000


def main(out="relict_monai", n_train: int = 8, size: int = 16, max_epochs: int = 8, interval: int = 4,
         steps_per_epoch: int = 4, progress: bool = True) -> ReplicaMonitorHandler:
    """Train, monitor, print a summary; outputs (history, per-check reports, checkpoints) go to ``out``."""
    start = time.perf_counter()
    out = Path(out)
    torch.manual_seed(0)
    train = make_phantoms(n_train, "head_ct", ndim=2, size=size, seed=0, id_prefix="patient")
    holdout = make_phantoms(32, "head_ct", ndim=2, size=size, seed=1, id_prefix="unseen")
    sampler = torch.utils.data.RandomSampler(train, replacement=True, num_samples=8 * steps_per_epoch)
    loader = torch.utils.data.DataLoader(train, batch_size=8, sampler=sampler)

    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    relict = ReplicaMonitorHandler(
        levels=[VoxelLevel()], holdout=holdout, cache_dir=out / "cache", alpha=0.05, num_samples=8,
        sampler=DiffusionSampler(DDIMScheduler(num_train_timesteps=TIMESTEPS), (1, size, size),
                                 num_inference_steps=10),
        interval=interval, max_replica_rate=0.5, patience=1, save_dir=out,
        progress=progress)  # the bank is built from the trainer's data_loader.dataset: the 8 training patients
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=unet,
        optimizer=torch.optim.AdamW(unet.parameters(), lr=2e-3), loss_function=torch.nn.MSELoss(),
        inferer=DiffusionInferer(DDPMScheduler(num_train_timesteps=TIMESTEPS)),
        prepare_batch=DiffusionPrepareBatch(num_train_timesteps=TIMESTEPS))
    Average(output_transform=from_engine(["loss"], first=True)).attach(trainer, "train_loss")
    relict.attach(trainer)  # before the CheckpointSaver, which reads the handler's metric at the same event
    CheckpointSaver(out / "checkpoints", {"net": unet, "relict": relict}, save_key_metric=True,
                    key_metric_name="relict/replica_rate", key_metric_negative_sign=True).attach(trainer)
    trainer.run()

    print(f"\nrelict MONAI example: a DDPM trained by a SupervisedTrainer on {n_train} phantom head CTs "
          f"({size}x{size}), sampled every {interval} epochs ({relict.monitor.num_samples} DDIM samples)")
    print(relict.monitor.history_table(epoch_offset=1, epoch_label="engine epoch"))
    print(f"NCC threshold {relict.monitor.scorer.thresholds['voxel']:.3f} (alpha 0.05 on {len(holdout)} unseen "
          "patients)")
    verdict = relict.stopping_reason_message or f"not stopped (ran {trainer.state.epoch} epochs)"
    safe = relict.safe_checkpoint()
    print(f"stopped: {verdict}")
    print(f"checkpoint to ship (certified <= 0.5 before detection): "
          f"{safe or f'none: {relict.monitor.safe_checkpoint_reason}'}")
    summary = {"stopped": relict.stopping_reason.name, "message": relict.stopping_reason_message,
               "safe_checkpoint": safe, "seconds": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"outputs in {out}/ (history.json, report-epoch=*.json, checkpoints/); {summary['seconds']:.0f} s")
    return relict


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="relict_monai")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    main(args.out, max_epochs=args.epochs)
