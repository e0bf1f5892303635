"""The check history and the checkpoint ledger: what each check measured, when memorization was first detected,
and which checkpoint file (identified by the step its content holds) is safe to ship.

A check of ``n`` samples bounds the true replica rate (exact one-sided bounds, ``relict/replica_rate_low`` /
``_high``). Memorization is **detected** at the first check whose lower bound is above the limit. A checkpoint is
**safe** when the file now holds the weights of a step that was checked (or certified) before that, with an
upper bound at or below the limit; with several measurements of one step, the one with most samples counts.

>>> ledger = Ledger()
>>> ledger.record(Check(0, 10, {"relict/replica_rate": 0.0, "relict/replica_rate_low": 0.0,
...                             "relict/replica_rate_high": 0.05}, num_samples=60))
>>> ledger.record(Check(1, 20, {"relict/replica_rate": 0.5, "relict/replica_rate_low": 0.3,
...                             "relict/replica_rate_high": 0.7}, num_samples=8))
>>> ledger.safe_checkpoint({"last.ckpt": 20}, max_replica_rate=0.1)  # last.ckpt now holds step 20, which copied
>>> print(ledger.reason)
no checkpoint file holds the weights of a check before memorization was detected at epoch 1 (lower bound 0.30 > 0.10)
>>> ledger.safe_checkpoint({"epoch=0.ckpt": 10, "last.ckpt": 20}, max_replica_rate=0.1)
'epoch=0.ckpt'
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write
from ..scoring import ReplicaReport
from .stop import StopReason

RATE, LOW, HIGH = "relict/replica_rate", "relict/replica_rate_low", "relict/replica_rate_high"
NOT_CHECKED = {RATE: 1.0, LOW: 0.0, HIGH: 1.0}  # what consumers see before the first successful check


@dataclass
class Check:
    """One scheduled check (or a certification): when it ran, what it measured (or why it failed), what it decided."""

    epoch: int
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    report: ReplicaReport | None = field(default=None, repr=False)
    samples: torch.Tensor | None = field(default=None, repr=False)
    error: str | None = None
    num_samples: int = 0
    stop_reason: StopReason = StopReason.NOT_STOPPED
    stop_message: str | None = None
    kind: str = "check"
    pictures: Any = field(default=None, repr=False, compare=False)  # presentation.Pictures, made when first shown

    @property
    def ok(self) -> bool:
        return self.error is None


class Ledger:
    """The history: one entry (a plain dict) per check or certification, with the checkpoint file holding its step."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.reason: str | None = None  # why the last safe_checkpoint() found none

    def record(self, check: Check, extra=None) -> None:
        """Append ``check`` with ``extra`` (the framework's other scalar metrics, e.g. losses)."""
        self.entries.append({"epoch": check.epoch, "step": check.step, **(extra or {}), **check.metrics,
                             "samples": check.num_samples, "error": check.error, "kind": check.kind,
                             "stop_reason": check.stop_reason.name, "checkpoint": None})

    def checks(self) -> list[dict]:
        return [e for e in self.entries if e.get("kind", "check") == "check"]

    def published(self) -> dict[str, float]:
        """What the monitor puts where EarlyStopping/ModelCheckpoint/CheckpointSaver look, on every epoch: the latest
        successful check's metrics, or ``NOT_CHECKED`` (rate 1.0 = not certified, bounds 0-1) before the first;
        ``relict/checked`` (0/1: a check has succeeded) and ``relict/check_failed`` (1: the latest check failed)."""
        checks = self.checks()
        good = next((e for e in reversed(checks) if e["error"] is None), None)
        values = NOT_CHECKED if good is None else {k: v for k, v in good.items() if k.startswith("relict/")}
        failed = bool(checks) and checks[-1]["error"] is not None
        return {**values, "relict/checked": float(good is not None), "relict/check_failed": float(failed)}

    def detected(self, limit: float) -> dict | None:
        """The first measurement whose lower bound is above ``limit``: memorization detected there."""
        return next((e for e in sorted(self._good(), key=lambda e: e["step"]) if e.get(LOW, 0.0) > limit), None)

    def evidence(self, step: int) -> dict | None:
        """The measurement of ``step`` with the most samples (a certification outweighs a routine check)."""
        return max((e for e in self._good() if e["step"] == step), key=lambda e: e["samples"], default=None)

    def note_files(self, files: dict[str, int | None]) -> None:
        """Show, with each check, a file that now holds its step (``files``: path -> step, see ``checkpoints.scan``)."""
        for entry in self.entries:
            entry["checkpoint"] = self.holder(files, entry["step"]) if entry["step"] in files.values() else None

    def candidates(self, files: dict[str, int | None], max_replica_rate: float) -> list[dict]:
        """The measurements (most samples per step) of the steps that ``files`` (path -> step) hold and that came
        before memorization was detected, oldest first: the checkpoints that may be shipped once certified."""
        onset = self.detected(max_replica_rate)
        steps = {s for s in files.values() if s is not None and (onset is None or s < onset["step"])}
        return sorted(filter(None, map(self.evidence, steps)), key=lambda e: e["step"])

    def holder(self, files: dict[str, int | None], step: int) -> str:
        """A file holding ``step``, one whose name is not reused (``last*``) if possible."""
        return min((p for p, s in files.items() if s == step), key=_preference)

    def safe_checkpoint(self, files: dict[str, int | None], max_replica_rate: float, metric: str | None = None,
                        mode: str = "min") -> str | None:
        """The checkpoint to ship among ``files`` (path -> the step it holds): a safe one (see the module), the
        latest, or the best by ``metric`` (a key in the history, e.g. ``"val_loss"``) in ``mode`` ``"min"``/
        ``"max"``. ``None`` when none qualifies, with the reason in :attr:`reason`."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        before = self.candidates(files, max_replica_rate)
        safe = [e for e in before if e.get(HIGH, 1.0) <= max_replica_rate]
        if metric is not None:
            safe = [e for e in safe if e.get(metric) is not None and np.isfinite(e[metric])]
            safe.sort(key=lambda e: e[metric] if mode == "max" else -e[metric])
        self.reason = None if safe else self._why_none(files, before, max_replica_rate, metric)
        return self.holder(files, safe[-1]["step"]) if safe else None

    def _why_none(self, files, before, limit, metric) -> str:
        onset = self.detected(limit)
        found = (f" before memorization was detected at epoch {onset['epoch']} (lower bound {onset[LOW]:.2f} > "
                 f"{limit:.2f})") if onset is not None else ""
        if not files:
            return ("no checkpoint files found: add a ModelCheckpoint (Lightning) or attach a CheckpointSaver "
                    "(MONAI), or pass checkpoint_dirs=[...]")
        if not self._good():
            return "no check has succeeded yet"
        if not any(self.evidence(s) for s in files.values() if s is not None):
            return (f"none of the {len(files)} checkpoint file(s) holds the weights of a checked step: save "
                    "checkpoints on the epochs the monitor checks (e.g. ModelCheckpoint(every_n_epochs=...) equal "
                    "to the monitor's)")
        if not before:
            return f"no checkpoint file holds the weights of a check{found}"
        if metric is not None and any(e.get(HIGH, 1.0) <= limit for e in before):
            return f"no certified checkpoint has the metric {metric!r} in its history entry"
        latest = before[-1]
        return (f"no checkpoint is certified: the latest candidate, {self.holder(files, latest['step'])} (epoch "
                f"{latest['epoch']}, {round(latest[RATE] * latest['samples'])} of {latest['samples']} samples "
                f"flagged), bounds the replica rate only at {latest.get(HIGH, 1.0):.2f} > {limit:.2f}{found}; "
                "certify it with more samples: monitor.certify(model, num_samples=..., checkpoint=...)")

    def _good(self) -> list[dict]:
        return [e for e in self.entries if e["error"] is None]

    def save(self, path) -> None:
        """Write the history as JSON, atomically."""
        with atomic_write(path) as file:
            json.dump(self.entries, file, indent=1, default=float)


def _preference(path: str) -> tuple[bool, str]:
    """Among files holding one step, prefer one whose name is not reused (``last*``)."""
    return os.path.basename(path).startswith("last"), path
