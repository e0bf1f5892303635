"""``ReplicaMonitor``: the Lightning callback, a thin adapter over :class:`relict_callbacks.monitor.Monitor`."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from relict_callbacks.integrations.adapter import MonitorAdapter, notify_sinks, scalar_metrics
from relict_callbacks.integrations.tensorboard import TensorBoardSink
from relict_callbacks.integrations.wandb import WandbSink
from relict_callbacks.monitor import Check, Monitor, StopReason
from relict_callbacks.monitor.communicator import Communicator

log = logging.getLogger("relict_callbacks")


class ReplicaMonitor(MonitorAdapter, Callback):
    r"""Draw samples every few epochs, score them for replicas of training patients, log, and stop if they copy.

    The first check runs after the first epoch, then every ``every_n_epochs`` epochs (epochs ``N-1, 2N-1, ...``).
    Metrics (``relict/replica_rate`` with its bounds ``_low``/``_high``, ``relict/<level>/...``) go to the loggers
    on check epochs; on every epoch ``Monitor.published()`` is put in ``trainer.callback_metrics`` (the latest good
    check, never NaN; before the first, rate 1.0 with bounds 0-1 and ``relict/checked`` = 0; after a failed check
    the last good values with ``relict/check_failed`` = 1), so ``ModelCheckpoint(monitor="relict/replica_rate",
    mode="min")`` and ``EarlyStopping(monitor="relict/replica_rate_low", mode="min", divergence_threshold=0.05)``
    find them on every epoch (Lightning runs those monitoring callbacks after this one). Every
    ``ModelCheckpoint``'s folder is known to :meth:`safe_checkpoint`, which reads each file's ``global_step``.

    Args:
        bank: a ready :class:`~relict_callbacks.ReferenceBank`; or ``None`` and ``levels`` to build one at the
            start of training (rank 0, progress bar) from ``train_items`` or else the train dataloader's dataset,
            reused from ``cache_dir`` while the training data and levels are unchanged.
        levels, cache_dir, holdout, train_items: how to build the bank; ``holdout`` are real images not used in
            training (items, Dataset or DataLoader), for calibration.
        sampler: ``sampler(pl_module, num_samples, generator) -> images | (images, labels)``, e.g. a
            :class:`~relict_callbacks.integrations.samplers.DiffusionSampler`; default: ``pl_module.sample(n)``
            (or ``generate(n)``).
        num_samples: samples per check (split across processes under DDP, gathered and scored once).
        every_n_epochs: how often to check.
        alpha, rule, thresholds, search, confidence: scoring (see :class:`~relict_callbacks.ReplicaScorer`);
            ``confidence`` is that of each exact one-sided bound on the replica rate.
        max_replica_rate, patience, min_delta, stop_on: stopping (see :class:`~relict_callbacks.monitor.Monitor`):
            by default training stops once the replica rate exceeds ``max_replica_rate`` for ``patience`` checks.
        seed: seed of the sampling noise (the same draws every check).
        strict: raise on a failing check (sampler error, NaN, wrong shape) instead of logging and going on.
        save_dir: folder for ``history.json``, per-check reports and gallery PNGs (written atomically).
        gallery_size: sample/training pairs per gallery (W&B table, TensorBoard, PNG).
        log_training_images: ``False`` keeps training images (patient data) out of every gallery and logger.
        sinks: objects with ``log_check(check, monitor, trainer)`` called on rank 0 after each check; a
            :class:`~relict_callbacks.integrations.wandb.WandbSink` / ``TensorBoardSink`` is added by itself for an
            attached ``WandbLogger`` / ``TensorBoardLogger`` (galleries, histograms, alerts).
        progress: show a progress bar while building the bank.

    Example::

        from lightning import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint
        from relict_callbacks import ReplicaMonitor, VoxelLevel

        monitor = ReplicaMonitor(levels=[VoxelLevel()], cache_dir="relict_cache", num_samples=16,
                                 every_n_epochs=5, max_replica_rate=0.05, patience=2)
        trainer = Trainer(callbacks=[monitor, ModelCheckpoint(monitor="relict/replica_rate", every_n_epochs=5)])
        trainer.fit(model, train_loader)
        monitor.safe_checkpoint()   # latest checkpoint certified <= 0.05 before memorization was detected
    """

    def __init__(self, bank=None, *, levels=None, cache_dir=None, holdout=None, train_items=None, sampler=None,
                 num_samples: int = 16, every_n_epochs: int = 1, alpha: float = 0.01, rule: str = "any",
                 thresholds=None, search: str = "exact", confidence: float = 0.95,
                 max_replica_rate: float | None = None, patience: int = 1,
                 min_delta: float = 0.0, stop_on=None, seed: int = 0, strict: bool = False, save_dir=None,
                 gallery_size: int = 8, log_training_images: bool = True, sinks=(), progress: bool = True) -> None:
        self.monitor = Monitor(bank, levels=levels, cache_dir=cache_dir, holdout=holdout, sampler=sampler,
                               num_samples=num_samples, every=every_n_epochs, alpha=alpha, rule=rule,
                               thresholds=thresholds, search=search, confidence=confidence,
                               max_replica_rate=max_replica_rate,
                               patience=patience, min_delta=min_delta, stop_on=stop_on, seed=seed, strict=strict,
                               save_dir=save_dir, gallery_size=gallery_size,
                               log_training_images=log_training_images)
        self.train_items, self.sinks, self.progress = train_items, list(sinks), progress
        self.stopped_epoch = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_samples=self.monitor.num_samples, every_n_epochs=self.monitor.every)

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        outcome = None
        if trainer.is_global_zero:
            try:
                self.monitor.device = pl_module.device
                self.monitor.scorer_options["device"] = pl_module.device
                self.monitor.prepare(self._train_items(trainer), progress=self.progress)
                outcome = self.monitor.bank.image_shape
            except Exception as error:  # every rank must learn about it, or the others wait forever
                outcome = f"{type(error).__name__}: {error}"
                if trainer.world_size == 1:
                    raise
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if isinstance(outcome, str):
            raise RuntimeError(f"ReplicaMonitor could not build its reference bank on rank 0: {outcome}")
        self.monitor.image_shape = outcome
        folders = [str(c.dirpath) for c in trainer.checkpoint_callbacks
                   if isinstance(c, ModelCheckpoint) and c.dirpath is not None]
        self.monitor.checkpoint_dirs = list(dict.fromkeys(self.monitor.checkpoint_dirs + folders))
        self._add_logger_sinks(trainer)

    def _add_logger_sinks(self, trainer: Trainer) -> None:
        """Galleries and histograms for the attached W&B and TensorBoard loggers (rank 0, once)."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and not any(isinstance(s, WandbSink) for s in self.sinks):
                try:
                    self.sinks.append(WandbSink(logger.experiment))
                except Exception as error:  # e.g. no credentials: metrics still reach monitor.history
                    log.warning("relict: no W&B gallery or alerts, the W&B run is unavailable: %s", error)
            if isinstance(logger, TensorBoardLogger) and not any(isinstance(s, TensorBoardSink) for s in self.sinks):
                self.sinks.append(TensorBoardSink(logger.experiment))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        check = self._check(trainer, pl_module) if self.monitor.is_due(epoch) else None
        # every epoch, for ModelCheckpoint/EarlyStopping (never missing, never NaN); loggers only get new checks
        pl_module.log_dict(self.monitor.published(), on_step=False, on_epoch=True, logger=False, sync_dist=False)
        if check is not None and check.ok and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**check.metrics, "epoch": epoch}, step=trainer.global_step)
        if check is not None and check.stop_reason is not StopReason.NOT_STOPPED:
            trainer.should_stop = True
            self.stopped_epoch = epoch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        files = self.monitor.checkpoints() if trainer.is_global_zero else None
        self.monitor.ledger.note_files(trainer.strategy.broadcast(files, src=0))  # the same history on every rank
        if self.monitor.save_dir is not None and trainer.is_global_zero:
            self.monitor.save_history()

    # -- internals ---------------------------------------------------------------------------------------------
    def _train_items(self, trainer: Trainer):
        if self.train_items is not None or self.monitor.bank is not None:
            return self.train_items
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError("ReplicaMonitor: the train dataloader has no .dataset to build the bank from; pass "
                             "bank=... or train_items=...")
        return dataset  # the whole dataset, not this rank's shard

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> Check:
        extra = scalar_metrics(trainer.callback_metrics)
        check = self.monitor.check(pl_module, trainer.current_epoch, trainer.global_step, extra,
                                   StrategyCommunicator(trainer, pl_module.device))
        if trainer.is_global_zero and check.ok:
            notify_sinks(self.sinks, check, self.monitor, trainer, "relict", f"epoch {check.epoch}")
        return check


class StrategyCommunicator(Communicator):
    """The processes of a Lightning run, through its strategy's collectives."""

    def __init__(self, trainer: Trainer, device: torch.device) -> None:
        self.strategy, self.device = trainer.strategy, device
        self.rank, self.world_size = trainer.global_rank, trainer.world_size

    def any(self, flag: bool) -> bool:
        return bool(self.strategy.all_gather(torch.tensor([flag], device=self.device)).any())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.all_gather(tensor.to(self.device)).cpu().flatten(0, 1)

    def broadcast(self, value):
        return self.strategy.broadcast(value, src=0)
