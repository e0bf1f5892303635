"""``Monitor``: the coordinator of a replica check, without any training framework.

It owns the schedule (which epochs are checked) and the reference bank and scorer; a check draws samples
(:mod:`.sampling`), scores them, asks the stop policy (:mod:`.stop`), records the outcome (:mod:`.ledger`) and
writes the pictures (:mod:`.presentation`). The adapters in ``relict_callbacks.integrations`` translate framework
events into :meth:`Monitor.prepare` and :meth:`Monitor.check`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from ..bank import ReferenceBank
from ..gallery import GalleryRow, gallery_figure, save_figure
from ..intervals import rate_bounds, samples_to_certify
from ..levels import Level
from ..scoring import RULES, ReplicaScorer
from ..validation import check_number, check_probability
from . import certification, checkpoints, presentation
from .communicator import SINGLE_PROCESS, Communicator
from .ledger import LOW, RATE, Check, Ledger
from .sampling import SamplerError, default_sampler, draw_samples
from .stop import StopPolicy, StopReason

log = logging.getLogger("relict_callbacks")


class Monitor:
    """Schedule, sample, score, remember and decide: the replica monitor without any training framework.

    Every option is declared here once; the Lightning callback and the MONAI handler take them as they are.

    Args:
        bank: a ready :class:`ReferenceBank`; or ``None`` and ``levels`` to build one in :meth:`prepare`.
        levels: the RELICT levels to build the bank with, e.g. ``[VoxelLevel()]``; the first is the primary level,
            which orders and shows galleries and fills the history table.
        train_items: the training images to build the bank from (items, Dataset or DataLoader); default: what the
            adapter finds (the train dataloader's or the engine's dataset).
        holdout: real images not used in training, for calibration.
        cache_dir: folder where the bank is saved and reused while the training data and levels are unchanged.
        sampler: ``sampler(model, num_samples, generator) -> images`` or ``-> (images, labels)``, e.g. a
            :class:`~relict_callbacks.integrations.samplers.DiffusionSampler`; default: the model's
            ``sample(n)``/``generate(n)``.
        num_samples: samples drawn per check (split over processes in distributed training, scored once).
        every_n_epochs: check after the first epoch, then every ``every_n_epochs`` epochs (epochs ``N-1, 2N-1, ...``).
        alpha: false-positive rate that sets each level's threshold (see :class:`ReplicaScorer`).
        confidence: level of the one-sided bounds ``relict/replica_rate_low`` / ``_high``.
        rule: how many levels must flag a sample for it to count as a replica: ``"any"``, ``"all"``, ``"majority"``.
        thresholds: explicit per-level thresholds, e.g. ``{"voxel": 0.9}``, instead of calibrated ones.
        search: ``"exact"`` or a faiss index kind for large banks.
        max_replica_rate: the limit on the replica rate. Memorization is detected when a check's lower bound is
            above it; a checkpoint is safe only when certified under it (upper bound <= limit, see
            :meth:`safe_checkpoint`).
        patience: consecutive bad checks before stopping.
        min_delta: for ``"rising"``, how far above its lowest value the rate must be to count as rising.
        stop_on: criteria that stop training: ``"limit"`` (lower bound > ``max_replica_rate``: memorization
            detected) and/or ``"rising"`` (rate > lowest rate so far + ``min_delta``); default ``("limit",)`` when
            ``max_replica_rate`` is set (see :class:`~.stop.StopPolicy`).
        seed: seed of the sampling noise; the same every check, offset by the process rank.
        strict: raise on a failing check (sampler error, NaN, wrong shape) instead of logging it and going on.
        save_dir: folder for ``history.json`` and, per check, ``report-epoch=E.json`` and ``gallery-epoch=E.png``.
        gallery_size: sample/training pairs per gallery (PNG, W&B table, TensorBoard).
        log_training_images: ``False`` keeps training images (patient data) out of every gallery and logger,
            leaving synthetic images, ids and scores.
        device: where the bank is built and samples are scored; default: the model's device (``"cpu"`` alone).
        progress: show a progress bar while building the bank.
        checkpoint_dirs: folders whose checkpoint files :meth:`safe_checkpoint` considers (the adapters add their
            framework's checkpoint folders by themselves).

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

    def __init__(self, bank: ReferenceBank | None = None, *, levels: list[Level] | None = None,
                 train_items: Any = None, holdout: Any = None, cache_dir: str | os.PathLike | None = None,
                 sampler: Callable | None = None,
                 num_samples: int = 16, every_n_epochs: int = 1, alpha: float = 0.01, confidence: float = 0.95,
                 rule: str = "any", thresholds: dict[str, float] | None = None, search: str = "exact",
                 max_replica_rate: float | None = None, patience: int = 1, min_delta: float = 0.0,
                 stop_on: str | list[str] | None = None, seed: int = 0, strict: bool = False,
                 save_dir: str | os.PathLike | None = None, gallery_size: int = 8, log_training_images: bool = True,
                 device: str | torch.device | None = None, progress: bool = True,
                 checkpoint_dirs: list[str | os.PathLike] = ()) -> None:
        if bank is None and not levels:
            raise ValueError("pass bank=ReferenceBank(...) or levels=[...] to build one from the training data")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        for name, value in (thresholds or {}).items():
            check_number(f"thresholds[{name!r}]", value)
        self.stop = StopPolicy(max_replica_rate, patience, min_delta, stop_on)
        self.ledger = Ledger()
        self.bank, self.levels, self.train_items, self.holdout = bank, levels, train_items, holdout
        self.cache_dir = cache_dir
        self.sampler = sampler or default_sampler
        self.num_samples = check_number("num_samples", num_samples, low=1, integer=True)
        self.every_n_epochs = check_number("every_n_epochs", every_n_epochs, low=1, integer=True)
        self.scorer_options = dict(alpha=check_probability("alpha", alpha), rule=rule, thresholds=thresholds,
                                   search=search, confidence=check_probability("confidence", confidence))
        self.seed, self.strict = check_number("seed", seed, low=0, integer=True), strict
        self.save_dir, self.device, self.progress = save_dir, device, progress
        self.gallery_size = check_number("gallery_size", gallery_size, low=1, integer=True)
        self.log_training_images = log_training_images
        self.confidence = self.scorer_options["confidence"]
        self.checkpoint_dirs = [str(folder) for folder in checkpoint_dirs]
        self.scorer: ReplicaScorer | None = None
        self.image_shape = None if bank is None else bank.image_shape  # (channels, spatial dims) samples must have

    def prepare(self, train_items=None, *, device=None, comm: Communicator = SINGLE_PROCESS) -> None:
        """Build (or load from ``cache_dir``) the bank unless one was given, from the ``train_items`` option or
        else ``train_items``; make the scorer. ``device`` is used when the ``device`` option is not set. In a
        distributed run (``comm``) only rank 0 builds and scores; the others learn the shape samples must have."""
        if comm.world_size > self.num_samples:
            raise ValueError(f"num_samples={self.num_samples} is fewer than the {comm.world_size} processes, each of "
                             f"which draws at least one sample: set num_samples >= {comm.world_size}")
        self.image_shape = comm.from_rank_zero(lambda: self._build(train_items, self.device or device or "cpu"))

    def _build(self, train_items, device) -> tuple[int, int]:
        if self.bank is None:
            items = train_items if self.train_items is None else self.train_items
            if items is None:
                raise ValueError("no bank and no training items to build one from")
            self.bank = ReferenceBank.build(items, self.levels, holdout=self.holdout, cache_dir=self.cache_dir,
                                            device=device, progress=self.progress)
            log.info("relict: %s", self.bank.cache_message or f"reference bank of {len(self.bank)} images built")
        if self.scorer is None:
            self.scorer = ReplicaScorer(self.bank, **self.scorer_options, device=device)
            self._warn_if_uncertifiable()
        return self.bank.image_shape

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

    def check(self, model, epoch: int, step: int, extra=None, comm: Communicator = SINGLE_PROCESS) -> Check:
        """Run one check: draw samples (each process its share), score them once (rank 0), decide, record.

        ``extra`` are the framework's other scalar metrics, kept in the history. Every process of ``comm`` must call
        this together; they agree on failures first, then rank 0 gathers the samples, scores them, writes the files
        and decides, and every process records rank 0's outcome, so histories and stop decisions are the same
        everywhere. A failure on any process is recorded on every process and raised when ``strict``; the returned
        :class:`Check` says what happened.
        """
        error, images, labels = None, None, None
        try:
            images, labels = draw_samples(self.sampler, model, self.samples_for_rank(comm.rank, comm.world_size),
                                          self.seed + comm.rank, self.image_shape)
        except Exception as exc:
            error = exc
        message = self._agree_on_failure(error, comm)  # first, so no process waits in a gather the others skip
        if message is None:
            try:
                images = comm.gather(images)
                labels = None if labels is None else comm.gather(labels)
            except ValueError as exc:  # shapes differ between processes: every process raised the same
                error, message = exc, _describe(exc)
        if message is not None:
            return self._fail(error, message, epoch, step, comm)
        check = outcome = None
        if comm.rank == 0:
            try:
                check = self._score(images, labels, epoch, step)
                outcome = {"error": None, "metrics": check.metrics, "samples": check.num_samples, "extra": extra,
                           "stop_reason": check.stop_reason.name, "stop_message": check.stop_message,
                           "stop_state": self.stop.state_dict()}
            except Exception as exc:
                error, outcome = exc, {"error": _describe(exc)}
        outcome = comm.broadcast(outcome)
        if outcome["error"] is not None:
            return self._fail(error, outcome["error"], epoch, step, comm)
        if check is None:  # another process: take over rank 0's check and stop policy
            self.stop.load_state_dict(outcome["stop_state"])
            check = Check(epoch, step, outcome["metrics"], num_samples=outcome["samples"],
                          stop_reason=StopReason[outcome["stop_reason"]], stop_message=outcome["stop_message"])
        self._record(check, outcome["extra"], comm)
        return check

    def _agree_on_failure(self, error: BaseException | None, comm: Communicator) -> str | None:
        """What every process records when the sampler failed on any of them (rank 0's error, or which processes
        failed; those log their own error); ``None`` when it failed nowhere."""
        failed = comm.ranks_where(error is not None)
        if not failed:
            return None
        if error is not None and comm.rank != 0:
            log.warning("relict: sampling failed on process %d: %s", comm.rank, _describe(error))
        elsewhere = f"the sampler failed on process(es) {failed}, whose log has the error"
        return comm.broadcast(elsewhere if error is None else _describe(error))  # rank 0's message

    def _score(self, images, labels, epoch: int, step: int) -> Check:
        """Score the gathered samples, write the check's files and decide (rank 0)."""
        report = self.scorer.score(images, labels)
        check = Check(epoch, step, report.metrics(), report, images, num_samples=len(report.records))
        self._write_files(check)
        check.stop_reason = self.stop.update(check.metrics[RATE], check.epoch, check.metrics.get(LOW))
        if check.stop_reason is not StopReason.NOT_STOPPED:
            check.stop_message = self.stop.message
            log.warning("relict: stopping training: %s", check.stop_message)
        return check

    def _fail(self, error: BaseException | None, message: str, epoch: int, step: int, comm: Communicator) -> Check:
        if self.strict:
            raise error if error is not None else RuntimeError(message)
        if comm.rank == 0:
            log.warning("relict: check at epoch %d skipped, training goes on: %s", epoch, message)
        check = Check(epoch, step, error=message)
        self._record(check, comm=comm)
        return check

    def _record(self, check: Check, extra=None, comm: Communicator = SINGLE_PROCESS) -> None:
        self.ledger.record(check, extra)
        if self.save_dir is not None and comm.rank == 0:
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
        """The latest checkpoint file, not yet certified, holding a check from before detection whose replica rate
        was <= the limit: the one to :meth:`certify` when the routine checks are too small to certify it (after a
        certification that fell short, the one before it)."""
        files, limit = self.checkpoints(), self._limit(max_replica_rate)
        fitting = [e for e in self.ledger.candidates(files, limit) if e[RATE] <= limit and e.get("kind") != "certify"]
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


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, SamplerError) else f"{type(error).__name__}: {error}"
