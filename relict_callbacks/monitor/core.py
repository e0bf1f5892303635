"""``Monitor``: the coordinator of a replica check, without any training framework.

It owns the schedule (which epochs are checked) and the reference bank and scorer; a check draws samples
(:mod:`.sampling`), scores them, asks the stop policy (:mod:`.stop`), records the outcome (:mod:`.ledger`) and
writes the pictures (:mod:`.presentation`). The adapters in ``relict_callbacks.integrations`` translate framework
events into :meth:`Monitor.prepare` and :meth:`Monitor.check`.
"""

from __future__ import annotations

import logging
import math
import os

from ..bank import ReferenceBank
from ..gallery import GalleryRow, gallery_figure, save_figure
from ..intervals import rate_bounds, samples_to_certify
from ..scoring import ReplicaScorer
from . import certification, checkpoints, presentation
from .communicator import Communicator
from .ledger import LOW, RATE, Check, Ledger
from .sampling import SamplerError, default_sampler, draw_samples
from .stop import StopPolicy, StopReason

log = logging.getLogger("relict_callbacks")
SINGLE_PROCESS = Communicator()


class Monitor:
    """Schedule, sample, score, remember and decide: the replica monitor without any training framework.

    Args:
        bank: a ready :class:`ReferenceBank`; or ``None`` and ``levels`` to build one in :meth:`prepare`.
        levels, cache_dir, holdout: how to build (or reuse from ``cache_dir``) the bank when ``bank`` is None;
            ``holdout`` are real images not used in training, for calibration.
        sampler: ``sampler(model, num_samples, generator) -> images`` or ``-> (images, labels)``; default: the
            model's ``sample(n)``/``generate(n)``.
        num_samples: samples drawn per check (split over processes in distributed training).
        every: check every ``every`` epochs (at epochs ``every-1, 2*every-1, ...``) and after the first epoch.
        alpha, rule, thresholds, search: passed to :class:`ReplicaScorer`.
        confidence: of each exact one-sided bound on the replica rate (``relict/replica_rate_low``/``_high``).
        max_replica_rate, patience, min_delta, stop_on: when to stop (see :class:`~.stop.StopPolicy`): by default
            once the lower bound is above ``max_replica_rate`` for ``patience`` checks (memorization detected).
            ``max_replica_rate`` is also the limit a checkpoint must be certified under to be safe (see
            :meth:`safe_checkpoint`).
        seed: seed of the sampling noise; the same every check, offset by the process rank.
        strict: raise on a failing check instead of logging it and going on.
        save_dir: if set, ``history.json`` and, per check, ``report-epoch=E.json`` and ``gallery-epoch=E.png``
            (the most similar sample/training pairs) are written there.
        gallery_size: pairs in a gallery; log_training_images: ``False`` keeps training images (patient data) out
            of every gallery, leaving synthetic images, ids and scores.
        device: where the bank is built and samples are scored.
        checkpoint_dirs: folders whose checkpoint files :meth:`safe_checkpoint` considers (the adapters add their
            framework's checkpoint folders by themselves).

    >>> import torch, relict_callbacks as rc
    >>> from relict_callbacks.monitor import Monitor
    >>> train = rc.data.make_phantoms(12, ndim=2, size=32)
    >>> class Copier(torch.nn.Module):  # a "generator" that returns training images
    ...     def sample(self, n):
    ...         return torch.stack([torch.as_tensor(item["image"]) for item in train[:n]])
    >>> monitor = Monitor(levels=[rc.VoxelLevel(grid=32)], num_samples=4, alpha=0.1, max_replica_rate=0.5)
    >>> monitor.prepare(train, progress=False)
    >>> check = monitor.check(Copier(), epoch=0, step=10)
    >>> check.metrics["relict/replica_rate"], round(check.metrics["relict/replica_rate_low"], 2)
    (1.0, 0.47)
    >>> monitor.certify(Copier(), num_samples=12).metrics["relict/replica_rate_low"] > 0.5  # 12 of 12: a copier
    True
    """

    def __init__(self, bank: ReferenceBank | None = None, *, levels=None, cache_dir=None, holdout=None,
                 sampler=None, num_samples: int = 16, every: int = 1, alpha: float = 0.01, rule: str = "any",
                 thresholds=None, search: str = "exact", confidence: float = 0.95,
                 max_replica_rate: float | None = None, patience: int = 1, min_delta: float = 0.0, stop_on=None,
                 seed: int = 0, strict: bool = False, save_dir=None, gallery_size: int = 8,
                 log_training_images: bool = True, device="cpu", checkpoint_dirs=()) -> None:
        if bank is None and not levels:
            raise ValueError("pass bank=ReferenceBank(...) or levels=[...] to build one from the training data")
        if num_samples < 1 or every < 1:
            raise ValueError(f"num_samples and every must be >= 1, got {num_samples}, {every}")
        self.stop = StopPolicy(max_replica_rate, patience, min_delta, stop_on)
        self.ledger = Ledger()
        self.bank, self.levels, self.cache_dir, self.holdout = bank, levels, cache_dir, holdout
        self.sampler = sampler or default_sampler
        self.num_samples, self.every, self.seed, self.strict = num_samples, every, seed, strict
        self.scorer_options = dict(alpha=alpha, rule=rule, thresholds=thresholds, search=search, device=device,
                                   confidence=confidence)
        self.confidence = confidence
        self.checkpoint_dirs = [str(folder) for folder in checkpoint_dirs]
        self.save_dir, self.device = save_dir, device
        self.gallery_size, self.log_training_images = gallery_size, log_training_images
        self.scorer: ReplicaScorer | None = None
        self.image_shape = None if bank is None else bank.image_shape  # (channels, spatial dims) samples must have

    def prepare(self, train_items=None, progress: bool = True) -> None:
        """Build (or load from ``cache_dir``) the bank from ``train_items`` unless one was given; make the scorer."""
        if self.bank is None:
            if train_items is None:
                raise ValueError("no bank and no training items to build one from")
            self.bank = ReferenceBank.build(train_items, self.levels, holdout=self.holdout, cache_dir=self.cache_dir,
                                            device=self.device, progress=progress)
            log.info("relict: %s", self.bank.cache_message or f"reference bank of {len(self.bank)} images built")
        if self.scorer is None:
            self.scorer = ReplicaScorer(self.bank, **self.scorer_options)
            self._warn_if_uncertifiable()
        self.image_shape = self.bank.image_shape

    def _warn_if_uncertifiable(self) -> None:
        """Say once if no routine check can ever certify the limit: even 0 flagged leaves the upper bound above it."""
        limit = self.stop.max_replica_rate
        if limit is None or rate_bounds(0, self.num_samples, self.confidence)[1] <= limit:
            return
        needed = (f"that needs num_samples >= {samples_to_certify(limit, self.confidence)}" if limit > 0
                  else "no number of samples can")
        log.warning("relict: %d samples per check can never certify a replica rate <= %g at %g%% confidence (0 of "
                    "%d flagged still allows %.2f); %s. Checks still detect memorization; certify the checkpoint "
                    "to ship with monitor.certify(model, num_samples=..., checkpoint=...)", self.num_samples, limit,
                    100 * self.confidence, self.num_samples, rate_bounds(0, self.num_samples, self.confidence)[1],
                    needed)

    def is_due(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is checked: the first epoch, then every ``every`` epochs."""
        return epoch == 0 or (epoch + 1) % self.every == 0

    def check(self, model, epoch: int, step: int, extra=None, comm: Communicator = SINGLE_PROCESS) -> Check:
        """Run one check: draw samples (each process its share), score them once (rank 0), decide, record.

        ``extra`` are the framework's other scalar metrics, kept in the history. A failure on any process is
        recorded and logged on every process, and raised when ``strict``; the returned :class:`Check` says what
        happened. Every process of ``comm`` must call this together.
        """
        error, images, labels = None, None, None
        try:
            share = math.ceil(self.num_samples / comm.world_size)
            images, labels = draw_samples(self.sampler, model, share, self.seed + comm.rank, self.image_shape)
        except Exception as exc:
            error = exc
        if comm.world_size > 1:  # agree on failure first, so no process waits in a gather the others skip
            if comm.any(error is not None) and error is None:
                error = RuntimeError("the sampler failed on another process")
            if error is None:
                images = comm.gather(images)[: self.num_samples]
                labels = None if labels is None else comm.gather(labels)[: self.num_samples]
        if error is not None:
            return self._fail(error, epoch, step, comm)
        if comm.rank != 0:
            return self._adopt(comm.broadcast(None), epoch, step, comm)
        try:
            check = self._score(images, labels, epoch, step, comm)
            self._record(check, extra)
            self._write_files(check)
        except Exception as exc:
            comm.broadcast({"error": f"{type(exc).__name__}: {exc}"})
            return self._fail(exc, epoch, step, comm)
        comm.broadcast({"error": None, "metrics": check.metrics, "samples": check.num_samples, "extra": extra})
        return check

    def _score(self, images, labels, epoch: int, step: int, comm: Communicator) -> Check:
        report = self.scorer.score(images, labels)
        check = Check(epoch, step, report.metrics(), report, images, num_samples=len(report.records))
        self._decide(check, comm)
        return check

    def _decide(self, check: Check, comm: Communicator) -> None:
        check.stop_reason = self.stop.update(check.metrics[RATE], check.epoch, check.metrics.get(LOW))
        if check.stop_reason is not StopReason.NOT_STOPPED:
            check.stop_message = self.stop.message
            if comm.rank == 0:
                log.warning("relict: stopping training: %s", check.stop_message)

    def _adopt(self, outcome: dict, epoch: int, step: int, comm: Communicator) -> Check:
        """Take over the check rank 0 scored (with rank 0's view of the other metrics)."""
        if outcome["error"] is not None:
            return self._fail(RuntimeError(outcome["error"]), epoch, step, comm)
        check = Check(epoch, step, outcome["metrics"], num_samples=outcome["samples"])
        self._decide(check, comm)
        self._record(check, outcome["extra"])
        return check

    def _fail(self, error: BaseException, epoch: int, step: int, comm: Communicator) -> Check:
        if self.strict:
            raise error
        message = str(error) if isinstance(error, SamplerError) else f"{type(error).__name__}: {error}"
        if comm.rank == 0:
            log.warning("relict: check at epoch %d skipped, training goes on: %s", epoch, message)
        check = Check(epoch, step, error=message)
        self._record(check)
        return check

    def _record(self, check: Check, extra=None) -> None:
        self.ledger.record(check, extra)
        if self.save_dir is not None:
            self.save_history()

    def _write_files(self, check: Check) -> None:
        if self.save_dir is not None:
            check.report.to_json(os.path.join(self.save_dir, f"report-epoch={check.epoch}.json"))
            save_figure(gallery_figure(self.gallery(check), presentation.gallery_title(check)),
                        os.path.join(self.save_dir, f"gallery-epoch={check.epoch}.png"))

    # -- views and state -------------------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """One entry per check: epoch (0-based), step, every metric then known, error, stop reason, checkpoint."""
        return self.ledger.entries

    @property
    def max_replica_rate(self) -> float | None:
        return self.stop.max_replica_rate

    def published(self) -> dict[str, float]:
        """What the adapters publish on every epoch for ``EarlyStopping``/``ModelCheckpoint``/``CheckpointSaver``:
        the latest good check's metrics, never NaN; before the first, replica rate 1.0 (not certified) with bounds
        0-1; ``relict/checked`` (0/1) and ``relict/check_failed`` (1 when the latest check failed)."""
        return self.ledger.published()

    def checkpoints(self) -> dict[str, int | None]:
        """Every checkpoint file in :attr:`checkpoint_dirs`, with the step its content holds (read now)."""
        return checkpoints.scan(self.checkpoint_dirs)

    def note_checkpoints(self) -> None:
        """Show, in the history, which file now holds each check's weights."""
        self.ledger.note_files(self.checkpoints())

    def safe_checkpoint(self, max_replica_rate: float | None = None, metric: str | None = None,
                        mode: str = "min") -> str | None:
        """The checkpoint to ship, verified now from the files' content: among files holding the weights of a
        check (or certification) from before memorization was detected (a lower bound above the limit) whose upper
        bound is <= ``max_replica_rate`` (default: the monitor's), the latest, or the best by ``metric`` in
        ``mode`` (``"min"``/``"max"``). ``None`` when none qualifies; :attr:`safe_checkpoint_reason` says why."""
        files = self.checkpoints()
        self.ledger.note_files(files)
        return self.ledger.safe_checkpoint(files, self._limit(max_replica_rate), metric, mode)

    @property
    def safe_checkpoint_reason(self) -> str | None:
        """Why the last :meth:`safe_checkpoint` returned ``None`` (``None`` when it named a file)."""
        return self.ledger.reason

    def checkpoint_to_certify(self, max_replica_rate: float | None = None) -> str | None:
        """The latest checkpoint file holding a check from before detection whose replica rate was <= the limit:
        the one to :meth:`certify` when the routine checks are too small to certify it."""
        files, limit = self.checkpoints(), self._limit(max_replica_rate)
        fitting = [e for e in self.ledger.candidates(files, limit) if e[RATE] <= limit]
        return self.ledger.holder(files, fitting[-1]["step"]) if fitting else None

    def certify(self, model, num_samples: int, checkpoint=None, key: str | None = None) -> Check:
        """Score ``num_samples`` fresh samples of ``model`` or of ``checkpoint``'s weights loaded into it; see
        :func:`.certification.certify`."""
        return certification.certify(self, model, num_samples, checkpoint, key)

    def _limit(self, max_replica_rate: float | None) -> float:
        limit = self.stop.max_replica_rate if max_replica_rate is None else max_replica_rate
        if limit is None:
            raise ValueError("pass max_replica_rate=... (the monitor has none)")
        return limit

    def gallery(self, check: Check) -> list[GalleryRow]:
        """The check's most similar sample/training pairs, as the monitor's gallery options say."""
        return presentation.gallery(self.bank, check, self.gallery_size, self.log_training_images)

    def history_table(self, **options) -> str:
        """The history as a readable table (options: see :func:`.presentation.history_table`)."""
        return presentation.history_table(self.history, **options)

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

