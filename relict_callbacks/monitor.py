"""The framework-free monitoring logic shared by the Lightning callback and the MONAI handler.

A :class:`Monitor` owns the schedule (which epochs are checked), draws samples through a sampler with the same
seeded noise every check, scores them against a :class:`ReferenceBank`, keeps the history, decides when to stop
and round-trips its state through ``state_dict``/``load_state_dict``. The adapters in
``relict_callbacks.integrations`` only translate framework events into calls to it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from .atomic import atomic_write
from .bank import ReferenceBank
from .gallery import GalleryRow, gallery_figure, save_figure
from .report import gallery_rows
from .scoring import ReplicaReport, ReplicaScorer

log = logging.getLogger("relict_callbacks")

STOP_CRITERIA = ("limit", "rising")


class SamplerError(RuntimeError):
    """A sampler failed or returned something that cannot be scored (wrong type or shape, NaN)."""


class StopReason(Enum):
    """Why the monitor asked training to stop (like Lightning's ``EarlyStoppingReason``)."""

    NOT_STOPPED = 0
    RATE_ABOVE_LIMIT = 1
    RATE_RISING = 2


@dataclass
class Check:
    """One scheduled check: when it ran, what it measured (or why it failed) and what it decided."""

    epoch: int
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    report: ReplicaReport | None = field(default=None, repr=False)
    samples: torch.Tensor | None = field(default=None, repr=False)
    error: str | None = None
    num_samples: int = 0
    stop_reason: StopReason = StopReason.NOT_STOPPED
    stop_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@contextlib.contextmanager
def sampling_mode(model, seed: int):
    """Eval mode, no gradients and a forked, seeded global RNG around a sampler call; all restored after.

    The global RNG is seeded too, so samplers that draw from it (e.g. a scheduler's per-step noise) give the same
    samples every check, and the training RNG stream is left exactly where it was.
    """
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    training = [m.training for m in modules]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    for module in modules:
        module.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            yield
    finally:
        for module, was_training in zip(modules, training):
            module.train(was_training)


def default_sampler(model, num_samples: int, generator: torch.Generator):
    """Call the model's own ``sample(n)`` or ``generate(n)`` (passing ``generator=`` when it takes one)."""
    for name in ("sample", "generate"):
        method = getattr(model, name, None)
        if callable(method):
            if "generator" in inspect.signature(method).parameters:
                return method(num_samples, generator=generator)
            return method(num_samples)
    raise SamplerError(f"{type(model).__name__} has no sample(n) or generate(n) method; pass sampler=... "
                       "(see relict_callbacks.integrations.samplers)")


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
        max_replica_rate: the replica rate above which a check counts against the model.
        patience: consecutive bad checks before stopping.
        min_delta: for ``"rising"``, how far above its lowest value the rate must be to count as rising.
        stop_on: criteria that stop training: ``"limit"`` (rate > ``max_replica_rate``) and/or ``"rising"``
            (rate > lowest rate so far + ``min_delta``). Default: ``("limit",)`` when ``max_replica_rate`` is set.
        seed: seed of the sampling noise; the same every check, offset by the process rank.
        strict: raise on a failing check instead of logging it and going on.
        save_dir: if set, ``history.json`` and, per check, ``report-epoch=E.json`` and ``gallery-epoch=E.png``
            (the most similar sample/training pairs) are written there.
        gallery_size: pairs in a gallery; log_training_images: ``False`` keeps training images (patient data) out
            of every gallery, leaving synthetic images, ids and scores.

    >>> import torch, relict_callbacks as rc
    >>> from relict_callbacks.monitor import Monitor
    >>> train = rc.data.make_phantoms(12, ndim=2, size=32)
    >>> class Copier(torch.nn.Module):  # a "generator" that returns training images
    ...     def sample(self, n):
    ...         return torch.stack([torch.as_tensor(item["image"]) for item in train[:n]])
    >>> monitor = Monitor(levels=[rc.VoxelLevel(grid=32)], num_samples=4, alpha=0.1, max_replica_rate=0.5)
    >>> monitor.prepare(train, progress=False)
    >>> check = monitor.run(Copier(), epoch=0, step=10)
    >>> check.metrics["relict/replica_rate"], check.stop_reason.name
    (1.0, 'RATE_ABOVE_LIMIT')
    """

    def __init__(self, bank: ReferenceBank | None = None, *, levels=None, cache_dir=None, holdout=None,
                 sampler=None, num_samples: int = 16, every: int = 1, alpha: float = 0.01, rule: str = "any",
                 thresholds=None, search: str = "exact", max_replica_rate: float | None = None, patience: int = 1,
                 min_delta: float = 0.0, stop_on=None, seed: int = 0, strict: bool = False, save_dir=None,
                 gallery_size: int = 8, log_training_images: bool = True, device="cpu") -> None:
        if bank is None and not levels:
            raise ValueError("pass bank=ReferenceBank(...) or levels=[...] to build one from the training data")
        if num_samples < 1 or every < 1 or patience < 1:
            raise ValueError(f"num_samples, every and patience must be >= 1, got {num_samples}, {every}, {patience}")
        stop_on = (("limit",) if max_replica_rate is not None else ()) if stop_on is None else tuple(
            [stop_on] if isinstance(stop_on, str) else stop_on)
        unknown = set(stop_on) - set(STOP_CRITERIA)
        if unknown:
            raise ValueError(f"stop_on must be among {STOP_CRITERIA}, got {sorted(unknown)}")
        if "limit" in stop_on and max_replica_rate is None:
            raise ValueError("stop_on='limit' needs max_replica_rate")
        self.bank, self.levels, self.cache_dir, self.holdout = bank, levels, cache_dir, holdout
        self.sampler = sampler or default_sampler
        self.num_samples, self.every, self.seed, self.strict = num_samples, every, seed, strict
        self.scorer_options = dict(alpha=alpha, rule=rule, thresholds=thresholds, search=search, device=device)
        self.max_replica_rate, self.patience, self.min_delta, self.stop_on = max_replica_rate, patience, min_delta, stop_on
        self.save_dir, self.device = save_dir, device
        self.gallery_size, self.log_training_images = gallery_size, log_training_images
        self.scorer: ReplicaScorer | None = None
        self.history: list[dict] = []
        self.wait = {criterion: 0 for criterion in STOP_CRITERIA}
        self.lowest_rate = math.inf
        self.stop_reason, self.stop_message = StopReason.NOT_STOPPED, None
        self.announce = True  # log stop decisions (adapters turn it off on all but one process)

    # -- bank -------------------------------------------------------------------------------------------------
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

    # -- schedule ---------------------------------------------------------------------------------------------
    def is_due(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is checked: the first epoch, then every ``every`` epochs."""
        return epoch == 0 or (epoch + 1) % self.every == 0

    def samples_for_rank(self, rank: int = 0, world_size: int = 1) -> int:
        """How many of the ``num_samples`` process ``rank`` draws (all processes draw the same count)."""
        return math.ceil(self.num_samples / world_size)

    # -- sampling ---------------------------------------------------------------------------------------------
    def draw(self, model, rank: int = 0, world_size: int = 1, expected_shape=None):
        """Draw this process's share of samples with the check's fixed noise; return ``(images, labels)``.

        ``expected_shape`` is ``(channels, spatial_dims)``; by default the bank's. Raises :class:`SamplerError`.
        """
        n = self.samples_for_rank(rank, world_size)
        generator = torch.Generator(device=_device_of(model)).manual_seed(self.seed + rank)
        try:
            with sampling_mode(model, self.seed + rank):
                out = self.sampler(model, n, generator)
        except SamplerError:
            raise
        except Exception as error:
            raise SamplerError(f"sampler {_name(self.sampler)} raised {type(error).__name__}: {error}") from error
        images, labels = out if isinstance(out, (tuple, list)) else (out, None)
        channels, spatial_dims = expected_shape or self.bank.image_shape
        if not isinstance(images, torch.Tensor):
            raise SamplerError(f"sampler {_name(self.sampler)} returned {type(images).__name__}, expected a Tensor "
                               f"[N, C, *spatial]")
        if images.ndim != spatial_dims + 2 or images.shape[1] != channels or images.shape[0] != n:
            raise SamplerError(f"sampler {_name(self.sampler)} returned shape {tuple(images.shape)}; expected "
                               f"[{n}, {channels}, {', '.join('*' * spatial_dims)}] ({spatial_dims}D, {channels} "
                               f"channel(s), {n} samples)")
        bad = ~torch.isfinite(images.flatten(1)).all(1)
        if bad.any():
            raise SamplerError(f"sampler {_name(self.sampler)} returned non-finite values (NaN/inf) in sample(s) "
                               f"{bad.nonzero().flatten().tolist()}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[0] != n
                                   or labels.shape[2:] != images.shape[2:]):
            raise SamplerError(f"sampler {_name(self.sampler)} returned labels that do not match its images")
        return images.detach().float().cpu(), None if labels is None else labels.detach().cpu()

    # -- scoring and deciding ---------------------------------------------------------------------------------
    def evaluate(self, images: torch.Tensor, labels, epoch: int, step: int, extra=None) -> Check:
        """Score drawn samples, record the check in the history and decide whether to stop."""
        report = self.scorer.score(images, labels)
        check = Check(epoch, step, report.metrics(), report, images, num_samples=len(report.records))
        self._decide(check)
        self._record(check, extra)
        if self.save_dir is not None:
            report.to_json(os.path.join(self.save_dir, f"report-epoch={epoch}.json"))
            save_figure(gallery_figure(self.gallery(check), self.gallery_title(check)),
                        os.path.join(self.save_dir, f"gallery-epoch={epoch}.png"))
        return check

    def fail(self, error: BaseException, epoch: int, step: int) -> Check:
        """Record a failed check (logged, nothing else changes); re-raise in strict mode."""
        if self.strict:
            raise error
        message = str(error) if isinstance(error, SamplerError) else f"{type(error).__name__}: {error}"
        if self.announce:
            log.warning("relict: check at epoch %d skipped, training goes on: %s", epoch, message)
        check = Check(epoch, step, error=message)
        self._record(check)
        return check

    def run(self, model, epoch: int, step: int, extra=None) -> Check:
        """Draw, score, record and decide in one process; a failure is logged (raised when ``strict``)."""
        try:
            images, labels = self.draw(model)
            return self.evaluate(images, labels, epoch, step, extra)
        except Exception as error:
            return self.fail(error, epoch, step)

    def _decide(self, check: Check) -> None:
        rate = check.metrics["relict/replica_rate"]
        bad = {"limit": self.max_replica_rate is not None and rate > self.max_replica_rate,
               "rising": rate > self.lowest_rate + self.min_delta}
        for criterion in STOP_CRITERIA:
            self.wait[criterion] = self.wait[criterion] + 1 if bad[criterion] else 0
        self.lowest_rate = min(self.lowest_rate, rate)
        checks = lambda n: f"{n} check{'s' * (n != 1)}"  # noqa: E731
        if "limit" in self.stop_on and self.wait["limit"] >= self.patience:
            check.stop_reason = StopReason.RATE_ABOVE_LIMIT
            check.stop_message = (f"replica rate {rate:.2f} > {self.max_replica_rate:.2f} for "
                                  f"{checks(self.wait['limit'])} at epoch {check.epoch}")
        elif "rising" in self.stop_on and self.wait["rising"] >= self.patience:
            check.stop_reason = StopReason.RATE_RISING
            check.stop_message = (f"replica rate {rate:.2f} above its lowest {self.lowest_rate:.2f} (+{self.min_delta}) "
                                  f"for {checks(self.wait['rising'])} at epoch {check.epoch}")
        if check.stop_reason is not StopReason.NOT_STOPPED:
            self.stop_reason, self.stop_message = check.stop_reason, check.stop_message
            if self.announce:
                log.warning("relict: stopping training: %s", check.stop_message)

    def _record(self, check: Check, extra=None) -> None:
        entry = {"epoch": check.epoch, "step": check.step, **(extra or {}), **check.metrics,
                 "samples": check.num_samples, "error": check.error,
                 "stop_reason": check.stop_reason.name, "checkpoint": None}
        self.history.append(entry)
        if self.save_dir is not None:
            self.save_history(os.path.join(self.save_dir, "history.json"))

    def apply(self, check: Check, extra=None) -> None:
        """Adopt a check decided elsewhere (another process scored it): history, counters and stop state."""
        if check.ok:
            self._decide(check)
        self._record(check, extra)

    # -- pictures ---------------------------------------------------------------------------------------------
    def gallery(self, check: Check) -> list[GalleryRow]:
        """The check's most similar sample/training pairs (training images left out unless allowed)."""
        voxel = next((level for level in self.bank.levels if level.name == "voxel"), None)
        hidden = not self.log_training_images
        return gallery_rows(check.report, lambda record: check.samples[record.index],
                            lambda match: None if hidden else self.training_image(match.nearest_index),
                            None if voxel is None else voxel.grid, self.gallery_size)

    def gallery_title(self, check: Check) -> str:
        rate = check.metrics["relict/replica_rate"]
        return f"epoch {check.epoch}: replica rate {rate:.2f} ({check.num_samples} samples)"

    def training_image(self, index: int) -> torch.Tensor | None:
        """Training image ``index`` as the bank holds it (the voxel level's z-scored grid), or ``None``."""
        rows = self.bank.arrays.get("voxel", {}).get("rows")
        return None if rows is None else torch.from_numpy(np.asarray(rows[index], dtype=np.float32))

    # -- checkpoints ------------------------------------------------------------------------------------------
    @property
    def last_metrics(self) -> dict[str, float]:
        """The metrics of the latest successful check (empty before the first)."""
        return next(({k: v for k, v in e.items() if k.startswith("relict/")} for e in reversed(self.history)
                     if e["error"] is None), {})

    def note_checkpoint(self, epoch: int, step: int, path: str) -> None:
        """Attach a checkpoint file saved at ``(epoch, step)`` to that epoch's check, if there was one. A file
        written again (a fixed name such as ``last.pt``) now holds this epoch's weights, so older checks lose it."""
        for entry in self.history:
            if entry["checkpoint"] == str(path):
                entry["checkpoint"] = None
        for entry in reversed(self.history):
            if entry["epoch"] == epoch and entry["error"] is None:
                entry["checkpoint"] = str(path)
                break

    def safe_checkpoint(self, max_replica_rate: float | None = None, metric: str | None = None,
                        mode: str = "min") -> str | None:
        """The checkpoint to ship: among existing checkpoints whose check had a replica rate <= the limit
        (default: ``max_replica_rate``), the latest, or the best by ``metric`` (a key in the history, e.g.
        ``"val_loss"``) in ``mode`` ``"min"``/``"max"``. ``None`` when there is none."""
        limit = self.max_replica_rate if max_replica_rate is None else max_replica_rate
        if limit is None:
            raise ValueError("pass max_replica_rate=... (the monitor has none)")
        safe = [e for e in self.history if e["checkpoint"] and os.path.exists(e["checkpoint"])
                and e["error"] is None and e["relict/replica_rate"] <= limit]
        if metric is not None:
            safe = [e for e in safe if e.get(metric) is not None and np.isfinite(e[metric])]
            safe.sort(key=lambda e: e[metric] if mode == "max" else -e[metric])
        return safe[-1]["checkpoint"] if safe else None

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """History, patience counters, lowest rate, stop state and seed (plain Python values only)."""
        return {"history": [dict(e) for e in self.history], "wait": dict(self.wait), "lowest_rate": self.lowest_rate,
                "stop_reason": self.stop_reason.name, "stop_message": self.stop_message, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(e) for e in state["history"]]
        self.wait = dict(state["wait"])
        self.lowest_rate = state["lowest_rate"]
        self.stop_reason, self.stop_message = StopReason[state["stop_reason"]], state["stop_message"]
        self.seed = state["seed"]

    def history_table(self, level: str = "voxel", loss: str = "train_loss", epoch_offset: int = 0,
                      epoch_label: str = "epoch") -> str:
        """The history as a readable table: epoch, ``loss``, replica rate, mean/max similarity at ``level``,
        checkpoint file name (``epoch_offset=1`` numbers epochs from 1, as MONAI engines do)."""
        width = max(len(epoch_label), 5)
        lines = [f"{epoch_label:>{width}}  {loss:>10}  {'replica rate':>12}  {'mean sim':>8}  {'max sim':>7}  "
                 "checkpoint"]
        for entry in self.history:
            epoch = entry["epoch"] + epoch_offset
            if entry["error"] is not None:
                lines.append(f"{epoch:>{width}}  check failed: {entry['error']}")
                continue
            checkpoint = os.path.basename(entry["checkpoint"] or "-")
            lines.append(f"{epoch:>{width}}  {entry.get(loss, float('nan')):>10.4f}  "
                         f"{entry['relict/replica_rate']:>12.2f}  {entry[f'relict/{level}/nn_similarity_mean']:>8.3f}  "
                         f"{entry[f'relict/{level}/nn_similarity_max']:>7.3f}  {checkpoint}")
        return "\n".join(lines)

    def save_history(self, path) -> None:
        """Write the history as JSON, atomically."""
        with atomic_write(path) as file:
            json.dump(self.history, file, indent=1, default=float)


class MonitorAdapter:
    """The views of ``self.monitor`` that every framework adapter offers (Lightning callback, MONAI handler)."""

    monitor: Monitor

    @property
    def history(self) -> list[dict]:
        """One entry per check: epoch (0-based), step, every metric then known, error, stop reason, checkpoint."""
        return self.monitor.history

    @property
    def stopping_reason(self) -> StopReason:
        return self.monitor.stop_reason

    @property
    def stopping_reason_message(self) -> str | None:
        return self.monitor.stop_message

    def safe_checkpoint(self, max_replica_rate: float | None = None, metric: str | None = None,
                        mode: str = "min") -> str | None:
        """The latest (or best by ``metric``) recorded checkpoint whose replica rate stayed <= the limit."""
        return self.monitor.safe_checkpoint(max_replica_rate, metric, mode)

    def state_dict(self) -> dict:
        """The monitor's state: history, patience counters, lowest rate, stop state, seed (plain Python values)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.monitor.load_state_dict(state_dict)


def scalar_metrics(metrics) -> dict[str, float]:
    """The framework's other scalar metrics (losses, validation scores), kept with each check in the history."""
    def scalar(value) -> bool:
        if isinstance(value, torch.Tensor):
            return value.numel() == 1
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    return {key: float(value) for key, value in metrics.items() if not key.startswith("relict/") and scalar(value)}


def notify_sinks(sinks, check: Check, monitor: Monitor, context, who: str, where: str, logger=log) -> None:
    """Hand a successful check to each sink; a failing sink (e.g. W&B without credentials) is logged, never raised."""
    for sink in sinks:
        try:
            sink.log_check(check, monitor, context)
        except Exception as error:
            logger.warning(f"{who}: {type(sink).__name__} failed to log the check at {where}: {error}")


def _device_of(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def _name(sampler) -> str:
    return getattr(sampler, "__qualname__", type(sampler).__name__)
