"""``Monitor``: the coordinator of a replica check, without any training framework.

It owns the schedule (which epochs are checked) and the reference bank and scorer; a check draws samples
(:mod:`.sampling`) and runs the distributed protocol (:mod:`.checking`) that scores them and asks the stop policy
(:mod:`.stop`); it records the outcome (:mod:`.ledger`) and writes the pictures (:mod:`.presentation`). Its options
are declared in :mod:`.options`, the checkpoint views in :mod:`.selection`. The adapters in
``relict_callbacks.integrations`` translate framework events into :meth:`Monitor.prepare` and :meth:`Monitor.check`.
"""

from __future__ import annotations

import logging
import os

import torch

from ..bank import ReferenceBank
from ..gallery import GalleryRow
from ..scoring import ReplicaScorer
from . import certification, presentation
from .checking import run_check
from .communicator import SINGLE_PROCESS, Communicator
from .ledger import LOW, RATE, Check
from .options import MonitorOptions
from .sampling import draw_in_batches
from .selection import CheckpointSelection
from .stop import StopReason
from .training_set import check_one_training_set

log = logging.getLogger("relict_callbacks")


class Monitor(MonitorOptions, CheckpointSelection):
    """Schedule, sample, score, remember and decide: the replica monitor without any training framework.

    Every option is declared once, as an argument of :class:`~.options.MonitorOptions` (documented there); the
    Lightning callback and the MONAI handler take them as they are. The checkpoint to ship comes from
    :meth:`safe_checkpoint`, :meth:`checkpoint_to_certify` and :meth:`certify` (:mod:`.selection`).

    >>> import torch, relict_callbacks as rc
    >>> train = rc.data.make_phantoms(12, ndim=2, size=32)
    >>> class Copier(torch.nn.Module):  # a "generator" that returns training images
    ...     def sample(self, n):
    ...         return torch.stack([torch.as_tensor(item["image"]) for item in train[:n]])
    >>> monitor = rc.Monitor(levels=[rc.VoxelLevel(grid=32)], train_items=train, num_samples=4, alpha=0.1,
    ...                      max_replica_rate=0.5, progress=False)
    >>> monitor.prepare()
    >>> check = monitor.check(Copier(), epoch=0, step=10)
    >>> check.metrics["relict/replica_rate"], round(check.metrics["relict/replica_rate_low"], 2)
    (1.0, 0.47)
    >>> monitor.certify(Copier(), num_samples=12).metrics["relict/replica_rate_low"] > 0.5  # 12 of 12: a copier
    True
    """

    def prepare(self, train_items=None, *, device=None, comm: Communicator = SINGLE_PROCESS) -> None:
        """Build (or load from ``cache_dir``) the bank unless one was given, from the ``train_items`` option or
        else ``train_items``; make the scorer. ``device`` is used when the ``device`` option is not set. In a
        distributed run (``comm``) only rank 0 builds and scores; the others learn the shape samples must have."""
        if comm.world_size > self.num_samples:
            raise ValueError(f"num_samples={self.num_samples} is fewer than the {comm.world_size} processes, each of "
                             f"which draws at least one sample: set num_samples >= {comm.world_size}")
        if comm.world_size > 1:  # every process takes part, whatever it holds (a second prepare, a bank on one)
            handed = None if self.bank is not None or self.train_items is not None else train_items
            check_one_training_set(handed, comm)
        self.image_shape = comm.from_rank_zero(lambda: self._build(train_items, self.device or device or "cpu"))

    def _build(self, train_items, device) -> tuple[int, int]:
        if self.bank is None:
            items = train_items if self.train_items is None else self.train_items
            if items is None:
                raise ValueError("no bank and no training items to build one from")
            self.bank = ReferenceBank.build(items, self.levels, holdout=self.holdout, cache_dir=self.cache_dir,
                                            device=device, progress=self.progress)
            if torch.device(device).type != "cpu":  # placed for the nulls before training took its memory: at the
                self.bank.release_rows()  # first check, the rows are placed within the memory free then
            log.info("relict: %s", self.bank.cache_message or f"reference bank of {len(self.bank)} images built")
        if self.scorer is None:
            self.scorer = ReplicaScorer(self.bank, **self.scorer_options, device=device)
            certification.warn_if_uncertifiable(self.stop.max_replica_rate, self.num_samples, self.confidence)
        return self.bank.image_shape

    def is_due(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is checked: the first epoch, then every ``every_n_epochs`` epochs."""
        return epoch == 0 or (epoch + 1) % self.every_n_epochs == 0

    def samples_for_rank(self, rank: int, world_size: int) -> int:
        """How many of the ``num_samples`` the process ``rank`` draws: shares differ by at most one (the lower ranks
        draw the extra ones) and add up to ``num_samples``.

        >>> import relict_callbacks as rc
        >>> monitor = Monitor(levels=[rc.VoxelLevel()], num_samples=5)
        >>> [monitor.samples_for_rank(rank, 3) for rank in range(3)]
        [2, 2, 1]
        """
        return self.num_samples // world_size + (rank < self.num_samples % world_size)

    def check(self, model, epoch: int, step: int, extra=None, comm: Communicator = SINGLE_PROCESS,
              sampling_context=None) -> Check:
        """Run one check: draw samples (each process its share), score them once (rank 0), decide, record.
        ``sampling_context()`` is entered around each sampler call (the adapters pass their framework's autocast
        under mixed precision; scores are float32 whatever the context).

        ``extra`` are the framework's other scalar metrics, kept in the history. Every process of ``comm`` must call
        this together and records rank 0's outcome, so histories and stop decisions are the same everywhere (see
        :mod:`.checking`). A failure on any process is recorded on every process and raised when ``strict``; the
        returned :class:`Check` says what happened.
        """
        share, seed = self.samples_for_rank(comm.rank, comm.world_size), self.seed + comm.rank
        self.sampling_context = sampling_context  # certification samples as the checks did
        check, extra = run_check(lambda: draw_in_batches(self.sampler, model, share, seed, self.image_shape,
                                                         self.sample_batch_size, sampling_context, comm.world_size),
                                 lambda images, labels: self._judge(images, labels, epoch, step), self.stop, comm,
                                 epoch=epoch, step=step, extra=extra, strict=self.strict)
        self._record(check, extra, comm)
        return check

    def _judge(self, images, labels, epoch: int, step: int) -> Check:
        """Score the gathered samples, write the check's files and decide (rank 0)."""
        report = self.scorer.score(images, labels)
        check = Check(epoch, step, report.metrics(), report, images, num_samples=len(report.records))
        if self.save_dir is not None:
            presentation.save_check(self.save_dir, check, self.pictures(check))
        check.stop_reason = self.stop.update(check.metrics[RATE], check.epoch, check.metrics.get(LOW))
        if check.stop_reason is not StopReason.NOT_STOPPED:
            check.stop_message = self.stop.message
            log.warning("relict: stopping training: %s", check.stop_message)
        return check

    def _record(self, check: Check, extra=None, comm: Communicator = SINGLE_PROCESS) -> None:
        self.ledger.record(check, extra)
        if self.save_dir is not None and comm.rank == 0:
            self.save_history()

    # -- views and state -------------------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """One entry per check: epoch (0-based), step, every metric then known, error, stop reason, checkpoint."""
        return self.ledger.entries

    def pictures(self, check: Check) -> presentation.Pictures:
        """The check's gallery and figures, made once and shared by its PNG file and every sink (made again only
        if the gallery options have changed since)."""
        options = (self.gallery_size, self.log_training_images)
        if check.pictures is None or check.pictures.options != options:
            check.pictures = presentation.Pictures(self.bank, check, *options)
        return check.pictures

    def gallery(self, check: Check) -> list[GalleryRow]:
        """The check's most similar sample/training pairs, as the monitor's gallery options say."""
        return self.pictures(check).gallery

    def history_table(self, **options) -> str:
        """The history as a readable table, at the primary (first) level unless ``level=...`` (options: see
        :func:`.presentation.history_table`)."""
        return presentation.history_table(self.history, **{"level": self.bank.levels[0].name, **options})

    def save_history(self) -> None:
        """Write ``history.json`` in ``save_dir``, atomically."""
        self.ledger.save(os.path.join(self.save_dir, "history.json"))

    def state_dict(self) -> dict:
        """History, stop policy state and seed (plain Python values only)."""
        return {"history": [dict(e) for e in self.history], **self.stop.state_dict(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; keys missing from an older state keep their current values."""
        self.ledger.entries = [dict(e) for e in state.get("history", [])]
        self.stop.load_state_dict(state)
        self.seed = state.get("seed", self.seed)
