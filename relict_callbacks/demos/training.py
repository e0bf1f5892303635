"""Catch a diffusion model memorizing its training patients, while it trains, and certify the checkpoint to ship.

A small MONAI ``DiffusionModelUNet`` (DDPM) is trained with Lightning on three 16x16 phantom head CTs, long enough
to start copying them. ``ReplicaMonitor`` samples it every few epochs with the same DDIM noise, scores the samples
against a reference bank of the training set (calibrated on unseen phantom patients) and logs the replica rate
with its exact 95% bounds. Memorization is *detected* when the lower bound is above the limit (0.1); training stops
after two such checks. A routine check of 8 samples can never certify a rate <= 0.1 (that takes 29), so at the end
the latest checkpoint from before the onset is certified with many fresh samples (and, if it falls short, the one
before it), and only then named safe.

Run it with ``relict demo`` or ``python -m relict_callbacks.demos.training --out relict_demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

LOADED = time.perf_counter()  # before the heavy imports below, which count towards the wall time

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from monai.inferers import DiffusionInferer  # noqa: E402
from monai.networks.nets import DiffusionModelUNet  # noqa: E402
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler  # noqa: E402

from relict_callbacks import VoxelLevel  # noqa: E402
from relict_callbacks.data import make_phantoms  # noqa: E402
from relict_callbacks.integrations.lightning import ReplicaMonitor  # noqa: E402
from relict_callbacks.integrations.samplers import DiffusionSampler  # noqa: E402

LIMIT = 0.1
LR = 4e-3


class PhantomDDPM(L.LightningModule):
    """A DDPM on ``[1, size, size]`` images scaled to [-1, 1]."""

    def __init__(self, lr: float = LR, channels=(16, 32, 32)) -> None:
        super().__init__()
        self.lr = lr
        self.unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=channels,
                                       attention_levels=(False,) * len(channels), num_res_blocks=1, norm_num_groups=8)
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


class Stopwatch:
    """Seconds spent per stage: ``with watch("stage"):`` or ``watch.wrap("stage", function)``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def wrap(self, stage: str, function):
        def timed(*args, **kwargs):
            with self(stage):
                return function(*args, **kwargs)
        return timed


def main(out="relict_demo", n_train: int = 3, size: int = 16, max_epochs: int = 150, every_n_epochs: int = 10,
         steps_per_epoch: int = 4, batch_size: int = 24, num_samples: int = 8, certify_samples: int = 48,
         progress: bool = True, started: float = LOADED) -> ReplicaMonitor:
    """Train, monitor, certify, print a summary; outputs (history, per-check reports, checkpoints, CSV logs) go to
    ``out``. ``started``: when the run began (``time.perf_counter()``), for the wall time; default: when this
    module was loaded. Sets torch to one intra-op thread (fastest for this tiny network)."""
    watch, out = Stopwatch(), Path(out)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a network this small only loses time to a second thread's synchronisation
    train = make_phantoms(n_train, "head_ct", ndim=2, size=size, seed=0, id_prefix="patient")
    holdout = make_phantoms(48, "head_ct", ndim=2, size=size, seed=1, id_prefix="unseen")
    loader = torch.utils.data.DataLoader(train * (batch_size * steps_per_epoch // n_train + 1), batch_size=batch_size,
                                         shuffle=True, drop_last=True)  # steps_per_epoch batches
    model = PhantomDDPM()
    monitor = ReplicaMonitor(
        levels=[VoxelLevel()], train_items=train, holdout=holdout, cache_dir=out / "cache", alpha=0.05,
        sampler=DiffusionSampler(DDIMScheduler(num_train_timesteps=200), (1, size, size), num_inference_steps=20,
                                 network="unet"),
        num_samples=num_samples, every_n_epochs=every_n_epochs, max_replica_rate=LIMIT, patience=2, save_dir=out,
        progress=progress)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", monitor="relict/replica_rate", mode="min",
                                  save_top_k=-1, every_n_epochs=every_n_epochs, filename="{epoch}", save_last=True)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[monitor, checkpoints], logger=CSVLogger(out, name="logs"),
                        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=steps_per_epoch,
                        accelerator="auto", devices=1)
    with watch("bank build"):  # prepared here to time it: on the device the fit trains on, where checks score
        monitor.monitor.prepare(device=trainer.strategy.root_device)
    monitor.monitor.check = watch.wrap("checks", monitor.monitor.check)
    with watch("fit"):
        trainer.fit(model, loader)
    certificates = []  # (file, check): the latest uncertified candidate, walking back until one is certified
    with watch("certification"):
        while len(certificates) < 3 and (candidate := monitor.monitor.checkpoint_to_certify()) is not None:
            certificates.append((candidate, monitor.monitor.certify(model, certify_samples, checkpoint=candidate)))
            if certificates[-1][1].metrics["relict/replica_rate_high"] <= LIMIT:
                break
    safe = monitor.safe_checkpoint()

    print(f"\nrelict demo: a MONAI DDPM trained with Lightning on {n_train} phantom head CTs ({size}x{size}), "
          f"sampled every {every_n_epochs} epochs ({num_samples} DDIM samples; bounds: exact, one-sided 95%)")
    print(monitor.monitor.history_table())
    print(f"NCC threshold {monitor.monitor.scorer.thresholds['voxel']:.3f} (alpha 0.05 on {len(holdout)} unseen "
          "patients)")
    onset = monitor.monitor.ledger.detected(LIMIT)
    print("memorization detected: " + (f"epoch {onset['epoch']} (lower bound {onset['relict/replica_rate_low']:.2f} "
                                       f"> {LIMIT})" if onset else "no check's lower bound exceeded the limit"))
    print(f"stopped: {monitor.stopping_reason_message or f'not stopped (ran {trainer.current_epoch} epochs)'}")
    for candidate, certificate in certificates:
        flagged = round(certificate.metrics["relict/replica_rate"] * certify_samples)
        print(f"certified {Path(candidate).name} with {certify_samples} fresh samples: {flagged} flagged, replica "
              f"rate <= {certificate.metrics['relict/replica_rate_high']:.3f}")
    print(f"checkpoint to ship (certified <= {LIMIT} before detection): "
          f"{safe or f'none: {monitor.monitor.safe_checkpoint_reason}'}")
    checks = watch.seconds.get("checks", 0.0)
    stages = {"bank build": watch.seconds["bank build"], "training": watch.seconds["fit"] - checks,
              "checks (sampling, scoring, galleries)": checks,
              "certification": watch.seconds.get("certification", 0.0)}
    summary = {"stopped": monitor.stopping_reason.name, "message": monitor.stopping_reason_message,
               "detected_epoch": None if onset is None else onset["epoch"], "certified": [path for path, _ in certificates],
               "safe_checkpoint": safe, "seconds": round(time.perf_counter() - started, 1),
               "stage_seconds": {stage: round(seconds, 1) for stage, seconds in stages.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"outputs in {out}/ (history.json, report-epoch=*.json, checkpoints/, logs/)")
    print(f"wall time {summary['seconds']:.0f} s: " + ", ".join(f"{stage} {seconds:.1f} s"
                                                             for stage, seconds in stages.items()))
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="relict_demo")
    parser.add_argument("--epochs", type=int, default=150)
    args = parser.parse_args()
    main(args.out, max_epochs=args.epochs)
