"""``ReplicaMonitorHandler``: MONAI engine handler, a thin adapter over :class:`~relict_callbacks.monitor.Monitor`."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from relict_callbacks.bank import ReferenceBank
from relict_callbacks.integrations.adapter import (MonitorAdapter, checked_sinks, notify_sinks, scalar_metrics,
                                                   with_monitor_options)
from relict_callbacks.integrations.tensorboard import TensorBoardSink
from relict_callbacks.monitor import Check, Monitor, StopReason
from relict_callbacks.monitor.communicator import SINGLE_PROCESS, Communicator, current_communicator


class ReplicaMonitorHandler(MonitorAdapter):
    r"""Sample the engine's network every few epochs, score the samples for replicas of training patients, publish
    the replica metrics in ``engine.state.metrics`` and terminate the engine if the network copies.

    The first check runs after the first epoch, then every ``interval`` epochs (engine epochs ``1, interval,
    2*interval, ...``). At the end of *every* epoch ``Monitor.published()`` is written into ``engine.state.metrics``
    (the latest good check's ``relict/replica_rate``, its bounds ``_low``/``_high``, ``relict/<level>/...``; before
    the first, rate 1.0 with bounds 0-1 and ``relict/checked`` = 0; after a failed check the last good values with
    ``relict/check_failed`` = 1), so MONAI's ``CheckpointSaver(save_key_metric=True,
    key_metric_name="relict/replica_rate", key_metric_negative_sign=True)`` and ``EarlyStopHandler`` always find
    them. Ignite runs the handlers of one event in the order they were attached: attach
    this handler **before** any handler that reads its metrics (first in ``train_handlers``), or those find no
    ``relict/replica_rate`` after the first epoch.

    The sampler gets ``engine.network`` as its model (``SupervisedTrainer``), or ``engine.g_network`` for engines
    without one (``GanTrainer`` keeps its generator there). The bank is built (or loaded from ``cache_dir``) when
    the engine starts, from ``train_items`` or else the whole ``engine.data_loader.dataset``. A failing check
    (sampler error, NaN, wrong shape) is logged and training goes on, unless ``strict``. ``state_dict`` /
    ``load_state_dict`` hold plain Python values only, so ``CheckpointSaver(save_dict={..., "relict": handler})``
    and ``CheckpointLoader`` (``torch.load(weights_only=True)``) resume the history and patience counters.
    The saved state also holds the engine step it was saved at (``saved_at``), which is how :meth:`safe_checkpoint`
    knows what a file holds (so does the trainer's own state, ``save_dict={"trainer": trainer, ...}``): every
    attached ``CheckpointSaver``'s folder and the ``checkpoint_dirs`` option's are scanned, and each file judged by its
    content.
    Epochs in :attr:`history` and in the messages are 0-based (``engine.state.epoch - 1``), as in the Lightning
    callback. Under ``torch.distributed`` (``torchrun``, ignite ``idist``), each process samples its share of
    ``num_samples`` from its network (unwrapped from ``DistributedDataParallel``); rank 0 alone builds the bank,
    scores, writes files and feeds the sinks, and every process publishes the same metrics and stops at the same
    epoch. Afterwards, :attr:`history`, :attr:`stopping_reason` (``StopReason``), :attr:`stopping_reason_message`,
    :attr:`stopped_epoch` and :meth:`safe_checkpoint` tell what happened.

    Args:
        bank: a ready :class:`~relict_callbacks.ReferenceBank`; or ``None`` and the ``levels`` option.
        interval: check every ``interval`` epochs (and after the first), MONAI's name for the monitor's
            ``every_n_epochs``.
        sinks: objects with ``log_check(check, monitor, engine)``, called after each successful check, e.g.
            :class:`~relict_callbacks.integrations.wandb.WandbSink` ``(wandb.init(...))``; a failing sink is
            logged, never stops training.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``: each check's metrics as scalars at
            ``engine.state.epoch`` (MONAI's epoch-level convention), plus a
            :class:`~relict_callbacks.integrations.tensorboard.TensorBoardSink` for the gallery and histograms
            (at the iteration of the check).
        check_on_completed: also check when the run completes, if its last epoch was not checked.
        name: name of the ``logging.Logger``; default: the engine's logger (MONAI's handler convention).
        **options: every other option of :class:`~relict_callbacks.monitor.Monitor` (``levels``, ``num_samples``,
            ``max_replica_rate``, ``patience``, ``device``, ``checkpoint_dirs``, ...), documented there once. The
            sampler gets the engine's network as its model; the attached ``CheckpointSaver``\ s' folders join
            ``checkpoint_dirs`` by themselves.

    In a MONAI bundle config (``monai.bundle.ConfigParser``)::

        {"_target_": "relict_callbacks.ReplicaMonitorHandler", "interval": 5, "num_samples": 16,
         "levels": [{"_target_": "relict_callbacks.VoxelLevel"}], "max_replica_rate": 0.05}

    >>> import torch, relict_callbacks as rc
    >>> from monai.engines import SupervisedTrainer
    >>> from monai.engines.utils import DiffusionPrepareBatch
    >>> from monai.inferers import DiffusionInferer
    >>> from monai.networks.nets import DiffusionModelUNet
    >>> from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
    >>> from relict_callbacks.integrations.samplers import DiffusionSampler
    >>> unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8),
    ...                           attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    >>> relict = ReplicaMonitorHandler(
    ...     levels=[rc.VoxelLevel()], num_samples=4, interval=2, alpha=0.1, max_replica_rate=0.5, progress=False,
    ...     sampler=DiffusionSampler(DDIMScheduler(num_train_timesteps=50), (1, 16, 16), num_inference_steps=3))
    >>> trainer = SupervisedTrainer(
    ...     device="cpu", max_epochs=2, network=unet, optimizer=torch.optim.Adam(unet.parameters(), 1e-3),
    ...     loss_function=torch.nn.MSELoss(), inferer=DiffusionInferer(DDPMScheduler(num_train_timesteps=50)),
    ...     prepare_batch=DiffusionPrepareBatch(num_train_timesteps=50), train_handlers=[relict],
    ...     train_data_loader=torch.utils.data.DataLoader(rc.data.make_phantoms(8, size=16), batch_size=4))
    >>> trainer.run()
    >>> [entry["epoch"] for entry in relict.history], "relict/replica_rate" in trainer.state.metrics
    ([0, 1], True)
    """

    @with_monitor_options("every_n_epochs")
    def __init__(self, bank: ReferenceBank | None = None, *, interval: int = 1, sinks: Sequence[Any] = (),
                 summary_writer: Any = None, check_on_completed: bool = False, name: str | None = None,
                 **options) -> None:
        if "checkpoint_dir" in options:
            raise TypeError("ReplicaMonitorHandler: the option checkpoint_dir is now checkpoint_dirs, a list of "
                            "folders (as in the Lightning callback): pass checkpoint_dirs=[folder]")
        self.monitor = Monitor(bank, every_n_epochs=interval, **options)
        self.sinks = checked_sinks(sinks)
        if summary_writer is not None and not any(isinstance(sink, TensorBoardSink) for sink in self.sinks):
            self.sinks.append(TensorBoardSink(summary_writer))
        self.summary_writer = summary_writer
        self.check_on_completed = check_on_completed
        self.name = name
        self.logger = logging.getLogger(name)
        self.stopped_epoch = 0
        self._comm: Communicator = SINGLE_PROCESS
        self._engine: Engine | None = None

    # -- ignite --------------------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Prepare the bank at ``STARTED``; check and publish at ``EPOCH_COMPLETED``; at ``COMPLETED`` record the last
        checkpoints, write the history and, with ``check_on_completed``, check once more."""
        if self.name is None:
            self.logger = engine.logger
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        """Build or load the reference bank (unless given) on the engine's device (rank 0 of a distributed run)."""
        device = getattr(engine.state, "device", None)
        self._comm = current_communicator(device)  # NCCL on the engine's own GPU, current or not
        self.monitor.prepare(self._train_items(engine), device=device, comm=self._comm)
        folders = [str(saver.save_dir) for saver in _handlers(engine) if type(saver).__name__ == "CheckpointSaver"]
        self.monitor.checkpoint_dirs = list(dict.fromkeys(self.monitor.checkpoint_dirs + folders))

    def __call__(self, engine: Engine) -> None:
        """At the end of an epoch: check if due, publish the latest metrics, terminate if the monitor says stop."""
        epoch = engine.state.epoch - 1
        check = self._check(engine, epoch) if self.monitor.is_due(epoch) else None
        engine.state.metrics.update(self.monitor.published())
        if check is not None and check.stop_reason is not StopReason.NOT_STOPPED:  # decided on rank 0 for all
            if self._comm.rank == 0:
                self.logger.warning(f"ReplicaMonitorHandler: terminating training after engine epoch "
                                    f"{engine.state.epoch}: {check.stop_message}")
            self.stopped_epoch = epoch
            engine.terminate()

    def completed(self, engine: Engine) -> None:
        """At the end of the run: record the last checkpoints; check once more if asked and not done already."""
        epoch = engine.state.epoch - 1
        if self.check_on_completed and epoch >= 0 and not any(e["epoch"] == epoch for e in self.history):
            self._check(engine, epoch)
            engine.state.metrics.update(self.monitor.published())
        self.monitor.note_checkpoints(self._comm)

    def state_dict(self) -> dict:
        """The monitor's state (plain Python values) and ``saved_at``: the engine epoch (0-based) and step now, i.e.
        what a ``CheckpointSaver`` writing this state next to the network holds."""
        state = self.monitor.state_dict()
        if self._engine is not None:
            state["saved_at"] = {"epoch": self._engine.state.epoch - 1, "step": self._engine.state.iteration}
        return state

    # -- internals -----------------------------------------------------------------------------------------------
    def _train_items(self, engine: Engine):
        if self.monitor.train_items is not None or self.monitor.bank is not None:
            return None
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        if dataset is None:
            raise ValueError(f"ReplicaMonitorHandler: {type(engine).__name__} has no data_loader.dataset to build "
                             "the bank from; pass bank=... or train_items=...")
        return dataset  # the whole dataset

    def _network(self, engine: Engine) -> torch.nn.Module:
        for attribute in ("network", "g_network"):
            network = getattr(engine, attribute, None)
            if network is not None:
                return _unwrapped(network)
        raise ValueError(f"ReplicaMonitorHandler: {type(engine).__name__} has neither .network nor .g_network to "
                         "sample from")

    def _check(self, engine: Engine, epoch: int) -> Check:
        extra = scalar_metrics(engine.state.metrics)
        check = self.monitor.check(self._network(engine), epoch, engine.state.iteration, extra, self._comm,
                                   sampling_context=_autocast(engine))
        if check.ok and self._comm.rank == 0:
            self.logger.info(f"ReplicaMonitorHandler: engine epoch {engine.state.epoch}: replica rate "
                             f"{check.metrics['relict/replica_rate']:.3f} of {check.num_samples} samples")
            if self.summary_writer is not None:
                for key, value in check.metrics.items():
                    self.summary_writer.add_scalar(key, value, engine.state.epoch)
            notify_sinks(self.sinks, check, self.monitor, engine, "ReplicaMonitorHandler",
                         f"engine epoch {engine.state.epoch}", self.logger)
        return check


def _autocast(engine: Engine):
    """The autocast an ``amp=True`` engine runs its iterations in (``torch.autocast("cuda", **amp_kwargs)``), for the
    network to sample in the precision it trains in; ``None`` without ``amp``."""
    if not (getattr(engine, "amp", False) and torch.cuda.is_available()):
        return None
    options = dict(getattr(engine, "amp_kwargs", None) or {})  # not the engine: the monitor keeps this for certify
    return lambda: torch.autocast("cuda", **options)


def _unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside its DDP, DataParallel and ``torch.compile`` wrappers (``SupervisedTrainer(compile=True)``
    compiles a DDP-wrapped network), in any nesting: sampling runs none of DDP's collectives, and no graph compiled for
    training is compiled again for sampling."""
    while True:
        if isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            network = network._orig_mod
        else:
            return network


def _handlers(engine: Engine) -> list:
    """The objects whose methods are attached to ``engine`` (ignite keeps no public list of them)."""
    found = []
    for handlers in engine._event_handlers.values():
        for handler, _, _ in handlers:
            owner = getattr(inspect.unwrap(handler), "__self__", None)
            if owner is not None and owner not in found:
                found.append(owner)
    return found
