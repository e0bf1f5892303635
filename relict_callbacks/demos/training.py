"""Catch a diffusion model memorizing its training patients, while it trains.

A small MONAI ``DiffusionModelUNet`` (DDPM) is trained with Lightning on three 2D phantom head CTs, long
enough to start copying them. ``ReplicaMonitor`` samples it every few epochs with the same DDIM noise, scores the
samples against a reference bank of the training set (calibrated on unseen phantom patients), logs the replica rate
and stops training once most samples are copies. A ``ModelCheckpoint`` keeps a checkpoint at every check, and
``monitor.safe_checkpoint()`` names the last one that did not copy.

Run it with ``relict demo`` or ``python -m relict_callbacks.demos.training --out relict_demo``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from relict_callbacks import VoxelLevel
from relict_callbacks.data import make_phantoms
from relict_callbacks.integrations.lightning import ReplicaMonitor
from relict_callbacks.integrations.samplers import DiffusionSampler


class PhantomDDPM(L.LightningModule):
    """A DDPM on ``[1, size, size]`` images scaled to [-1, 1]."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64, 64),
                                       attention_levels=(False, False, False), num_res_blocks=1, norm_num_groups=16)
        self.scheduler = DDPMScheduler(num_train_timesteps=200)
        self.inferer = DiffusionInferer(self.scheduler)

    def training_step(self, batch, batch_index):
        images = batch["image"] * 2 - 1
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (len(images),), device=self.device)
        predicted = self.inferer(inputs=images, diffusion_model=self.unet, noise=noise, timesteps=timesteps)
        loss = F.mse_loss(predicted, noise)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(out="relict_demo", n_train: int = 3, size: int = 32, max_epochs: int = 150, every_n_epochs: int = 10,
         progress: bool = True) -> ReplicaMonitor:
    """Train, monitor, print a summary; outputs (history, per-check reports, checkpoints, CSV logs) go to ``out``."""
    start = time.perf_counter()
    out = Path(out)
    torch.manual_seed(0)
    train = make_phantoms(n_train, "head_ct", ndim=2, size=size, seed=0, id_prefix="patient")
    holdout = make_phantoms(48, "head_ct", ndim=2, size=size, seed=1, id_prefix="unseen")
    loader = torch.utils.data.DataLoader(train * (64 // n_train), batch_size=8, shuffle=True)  # 8 steps an epoch

    model = PhantomDDPM()
    monitor = ReplicaMonitor(
        levels=[VoxelLevel()], train_items=train, holdout=holdout, cache_dir=out / "cache", alpha=0.05,
        sampler=DiffusionSampler(DDIMScheduler(num_train_timesteps=200), (1, size, size), num_inference_steps=25,
                                 network="unet"),
        num_samples=8, every_n_epochs=every_n_epochs, max_replica_rate=0.1, patience=2, save_dir=out,
        progress=progress)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", monitor="relict/replica_rate", mode="min",
                                  save_top_k=-1, every_n_epochs=every_n_epochs, filename="{epoch}")
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[monitor, checkpoints], logger=CSVLogger(out, name="logs"),
                        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=8,
                        accelerator="auto", devices=1)
    trainer.fit(model, loader)

    print(f"\nrelict demo: a MONAI DDPM trained with Lightning on {n_train} phantom head CTs ({size}x{size}), "
          f"sampled every {every_n_epochs} epochs ({monitor.monitor.num_samples} DDIM samples)")
    print(monitor.monitor.history_table())
    print(f"NCC threshold {monitor.monitor.scorer.thresholds['voxel']:.3f} (alpha 0.05 on {len(holdout)} unseen "
          "patients)")
    verdict = monitor.stopping_reason_message or f"not stopped (ran {trainer.current_epoch} epochs)"
    safe = monitor.safe_checkpoint()
    print(f"stopped: {verdict}")
    print(f"checkpoint to ship (replica rate <= 0.1): {safe}")
    summary = {"stopped": monitor.stopping_reason.name, "message": monitor.stopping_reason_message,
               "safe_checkpoint": safe, "seconds": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"outputs in {out}/ (history.json, report-epoch=*.json, checkpoints/, logs/); "
          f"{summary['seconds']:.0f} s")
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="relict_demo")
    parser.add_argument("--epochs", type=int, default=150)
    args = parser.parse_args()
    main(args.out, max_epochs=args.epochs)
