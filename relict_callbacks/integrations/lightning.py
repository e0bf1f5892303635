"""``ReplicaMonitor``: the Lightning callback, a thin adapter over :class:`relict_callbacks.monitor.Monitor`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from relict_callbacks.bank import ReferenceBank
from relict_callbacks.integrations.adapter import (MonitorAdapter, checked_sinks, notify_sinks, scalar_metrics,
                                                   with_monitor_options)
from relict_callbacks.integrations.tensorboard import TensorBoardSink
from relict_callbacks.integrations.wandb import WandbSink
from relict_callbacks.monitor import Check, Monitor, StopReason
from relict_callbacks.monitor.communicator import Communicator


class ReplicaMonitor(MonitorAdapter, Callback):
    r"""Draw samples every few epochs, score them for replicas of training patients, log, and stop if they copy.

    The first check runs after the first epoch, then every ``every_n_epochs`` epochs (epochs ``N-1, 2N-1, ...``).
    Metrics (``relict/replica_rate`` with its bounds ``_low``/``_high``, ``relict/<level>/...``) go to the loggers
    on check epochs; on every epoch ``Monitor.published()`` is put in ``trainer.callback_metrics`` (the latest good
    check, never NaN; before the first, rate 1.0 with bounds 0-1 and ``relict/checked`` = 0; after a failed check
    the last good values with ``relict/check_failed`` = 1), so ``ModelCheckpoint(monitor="relict/replica_rate",
    mode="min")`` and ``EarlyStopping(monitor="relict/replica_rate_low", mode="min", divergence_threshold=0.05)``
    find them on every epoch (Lightning runs those monitoring callbacks after this one at training epoch end). Where
    they run at validation end instead (validation more than once an epoch, or not every epoch), they find the
    previous check's values (before the first, those above), one check late: a warning says so, and names the
    argument (``check_on_train_epoch_end=True``, ``save_on_train_epoch_end=True``) that moves them to epoch end. Every
    ``ModelCheckpoint``'s folder is known to :meth:`safe_checkpoint`, which reads each file's ``global_step``.
    Nothing is checked under ``fast_dev_run`` or during the sanity check.

    The bank is built at the start of training on rank 0 from the ``train_items`` option or else the train
    dataloader's whole dataset. The sampler gets the ``LightningModule`` as its model; with a ``WeightAveraging``
    callback (``EMAWeightAveraging``), whose checkpoints hold the averaged weights, its averaged copy.

    Args:
        bank: a ready :class:`~relict_callbacks.ReferenceBank`; or ``None`` and the ``levels`` option.
        sinks: objects with ``log_check(check, monitor, trainer)`` called on rank 0 after each check; a
            :class:`~relict_callbacks.integrations.wandb.WandbSink` / ``TensorBoardSink`` is added by itself for an
            attached ``WandbLogger`` / ``TensorBoardLogger`` (galleries, histograms, alerts).
        **options: every option of :class:`~relict_callbacks.monitor.Monitor` (``levels``, ``num_samples``,
            ``every_n_epochs``, ``max_replica_rate``, ``patience``, ``device``, ...), documented there once.

    Example::

        from lightning import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint
        from relict_callbacks import ReplicaMonitor, VoxelLevel

        monitor = ReplicaMonitor(levels=[VoxelLevel()], cache_dir="relict_cache", num_samples=16,
                                 every_n_epochs=5, max_replica_rate=0.05, patience=2)
        trainer = Trainer(callbacks=[monitor, ModelCheckpoint(monitor="relict/replica_rate", every_n_epochs=5)])
        trainer.fit(model, train_loader)
        monitor.safe_checkpoint()   # latest checkpoint certified <= 0.05 before memorization was detected

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: relict_callbacks.ReplicaMonitor
              init_args:
                levels: [{class_path: relict_callbacks.VoxelLevel, init_args: {grid: 64}}]
                num_samples: 16
                every_n_epochs: 5
                max_replica_rate: 0.05
    """

    @with_monitor_options()
    def __init__(self, bank: ReferenceBank | None = None, *, sinks: Sequence[Any] = (), **options) -> None:
        self.monitor = Monitor(bank, **options)
        self.sinks = checked_sinks(sinks)
        self.stopped_epoch = 0

    @property
    def state_key(self) -> str:
        monitor = self.monitor
        return self._generate_state_key(num_samples=monitor.num_samples, every_n_epochs=monitor.every_n_epochs)

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(_FSDP_REFUSED)
        if _in_spawned_processes(trainer):
            rank_zero_warn("relict: this fit runs in processes that ddp_spawn/ddp_fork started (notebooks with several "
                           "devices too): what the monitor records (history, stop reason, safe checkpoint) stays in "
                           "them, and this ReplicaMonitor in the launching process sees none of it; set save_dir= to "
                           "keep history.json and the reports, or launch with torchrun (strategy='ddp')")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _skipped(trainer):
            rank_zero_info("ReplicaMonitor: no replica checks under fast_dev_run")
            return
        self.monitor.prepare(self._train_items(trainer), device=pl_module.device,
                             comm=StrategyCommunicator(trainer, pl_module.device))
        folders = [str(c.dirpath) for c in trainer.checkpoint_callbacks
                   if isinstance(c, ModelCheckpoint) and c.dirpath is not None]
        self.monitor.checkpoint_dirs = list(dict.fromkeys(self.monitor.checkpoint_dirs + folders))
        self._add_logger_sinks(trainer)
        # there from the start: a monitoring callback run at validation end may read them before the first check
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in self.monitor.published().items()})
        for reader in _reading_at_validation_end(trainer):
            rank_zero_warn(f"relict: {reader} runs at validation end, before the check of its epoch (run at training "
                           "epoch end), so it reads the previous check's values, one check late")

    def _add_logger_sinks(self, trainer: Trainer) -> None:
        """Galleries and histograms for the attached W&B and TensorBoard loggers (rank 0, once)."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and not any(isinstance(s, WandbSink) for s in self.sinks):
                try:
                    self.sinks.append(WandbSink(logger.experiment))
                except Exception as error:  # e.g. no credentials: metrics still reach monitor.history
                    rank_zero_warn(f"relict: no W&B gallery or alerts, the W&B run is unavailable: {error}")
            if isinstance(logger, TensorBoardLogger) and not any(isinstance(s, TensorBoardSink) for s in self.sinks):
                self.sinks.append(TensorBoardSink(logger.experiment))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _skipped(trainer):
            return
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
        if _skipped(trainer):
            return
        self.monitor.note_checkpoints(StrategyCommunicator(trainer, pl_module.device))

    # -- internals ---------------------------------------------------------------------------------------------
    def _train_items(self, trainer: Trainer):
        if self.monitor.train_items is not None or self.monitor.bank is not None:
            return None
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError("ReplicaMonitor: the train dataloader has no .dataset to build the bank from; pass "
                             "bank=... or train_items=...")
        return dataset  # the whole dataset, not this rank's shard

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> Check:
        extra = scalar_metrics(trainer.callback_metrics)
        precision = trainer.precision_plugin  # under 16-mixed/bf16-mixed, the networks sample as they train
        autocast = precision.forward_context if isinstance(precision, MixedPrecision) else None
        averaged = _averaged(trainer)
        check = self.monitor.check(pl_module if averaged is None else averaged, trainer.current_epoch,
                                   trainer.global_step, extra, StrategyCommunicator(trainer, pl_module.device),
                                   sampling_context=autocast)
        if trainer.is_global_zero and check.ok:
            notify_sinks(self.sinks, check, self.monitor, trainer, "relict", f"epoch {check.epoch}")
        return check


def _in_spawned_processes(trainer: Trainer) -> bool:
    """Whether the fit runs in processes the trainer spawned or forked, whose state the launching process never
    sees (Lightning sends back only the weights and ``callback_metrics``)."""
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


_FSDP_REFUSED = (
    "ReplicaMonitor cannot check a model trained with FSDPStrategy: it wraps the whole LightningModule, whose weights "
    "are gathered only inside its own forward, so a sampler calling its networks would run on shards and every check "
    "would fail. Train with DDP, or audit samples drawn from the saved model with `relict audit`")


def _averaged(trainer: Trainer) -> LightningModule | None:
    """The averaged copy of the LightningModule that a ``WeightAveraging`` callback (``EMAWeightAveraging``) keeps,
    if any: its checkpoints hold those weights, so checks sample them and a checkpoint is judged by what it holds."""
    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
        if average is not None:
            return average.module
    return None


def _reading_at_validation_end(trainer: Trainer) -> list[str]:
    """The ``EarlyStopping``/``ModelCheckpoint`` callbacks monitoring a ``relict/`` metric that run at validation end
    (validation more than once an epoch, or not every epoch), each with the argument that moves it to epoch end."""
    sparse = (trainer.val_check_interval != 1.0 or trainer.check_val_every_n_epoch != 1
              or getattr(trainer, "_val_check_time_interval", None) is not None)  # as Lightning decides it
    found = []
    for callback in trainer.callbacks:
        key = getattr(callback, "monitor", None)
        if not (isinstance(key, str) and key.startswith("relict/")):
            continue
        if isinstance(callback, EarlyStopping):
            at_epoch_end, argument = getattr(callback, "_check_on_train_epoch_end", None), "check_on_train_epoch_end"
        elif isinstance(callback, ModelCheckpoint):
            at_epoch_end, argument = getattr(callback, "_save_on_train_epoch_end", None), "save_on_train_epoch_end"
        else:
            continue
        if at_epoch_end is False or (at_epoch_end is None and sparse):
            found.append(f"{type(callback).__name__}(monitor={key!r}) (pass {argument}=True)")
    return found


def _skipped(trainer: Trainer) -> bool:
    """No checks under ``fast_dev_run`` or during the sanity check (Lightning's own callbacks skip them too)."""
    return bool(trainer.fast_dev_run) or trainer.sanity_checking


class StrategyCommunicator(Communicator):
    """The processes of a Lightning run, through its strategy's collectives (DDP, FSDP, DeepSpeed, ...)."""

    def __init__(self, trainer: Trainer, device: torch.device) -> None:
        self.strategy, self.device = trainer.strategy, device
        self.rank, self.world_size = trainer.global_rank, trainer.world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.all_gather(tensor.to(self.device)).reshape(self.world_size, *tensor.shape)

    def broadcast(self, value):
        return self.strategy.broadcast(value, src=0)
