"""The check history and the checkpoint ledger: what each check measured, and which checkpoint file holds the
weights it checked, so the checkpoint to ship can be named afterwards.

>>> ledger = Ledger()
>>> ledger.record(Check(0, 10, {"relict/replica_rate": 0.0}))
>>> ledger.record(Check(1, 20, {"relict/replica_rate": 0.5}))
>>> ledger.note_checkpoint(0, 10, __file__); ledger.note_checkpoint(1, 20, __file__)  # the same file, rewritten
>>> ledger.safe_checkpoint(max_replica_rate=0.1) is None  # it now holds epoch 1's weights, which copied
True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..atomic import atomic_write
from ..scoring import ReplicaReport
from .stop import StopReason


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


class Ledger:
    """The history: one entry (a plain dict) per check, with the checkpoint file that holds its weights."""

    def __init__(self) -> None:
        self.entries: list[dict] = []

    def record(self, check: Check, extra=None) -> None:
        """Append ``check`` with ``extra`` (the framework's other scalar metrics, e.g. losses)."""
        self.entries.append({"epoch": check.epoch, "step": check.step, **(extra or {}), **check.metrics,
                             "samples": check.num_samples, "error": check.error,
                             "stop_reason": check.stop_reason.name, "checkpoint": None})

    @property
    def last_metrics(self) -> dict[str, float]:
        """The metrics of the latest successful check (empty before the first)."""
        return next(({k: v for k, v in e.items() if k.startswith("relict/")} for e in reversed(self.entries)
                     if e["error"] is None), {})

    def note_checkpoint(self, epoch: int, step: int, path: str) -> None:
        """Attach a checkpoint file saved at ``(epoch, step)`` to that epoch's check, if there was one. A file
        written again (a fixed name such as ``last.pt``) now holds this epoch's weights, so older checks lose it."""
        for entry in self.entries:
            if entry["checkpoint"] == str(path):
                entry["checkpoint"] = None
        for entry in reversed(self.entries):
            if entry["epoch"] == epoch and entry["error"] is None:
                entry["checkpoint"] = str(path)
                break

    def safe_checkpoint(self, max_replica_rate: float, metric: str | None = None, mode: str = "min") -> str | None:
        """The checkpoint to ship: among existing checkpoints whose check had a replica rate <= ``max_replica_rate``,
        the latest, or the best by ``metric`` (a key in the history, e.g. ``"val_loss"``) in ``mode``
        ``"min"``/``"max"``. ``None`` when there is none."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        safe = [e for e in self.entries if e["checkpoint"] and os.path.exists(e["checkpoint"])
                and e["error"] is None and e["relict/replica_rate"] <= max_replica_rate]
        if metric is not None:
            safe = [e for e in safe if e.get(metric) is not None and np.isfinite(e[metric])]
            safe.sort(key=lambda e: e[metric] if mode == "max" else -e[metric])
        return safe[-1]["checkpoint"] if safe else None

    def save(self, path) -> None:
        """Write the history as JSON, atomically."""
        with atomic_write(path) as file:
            json.dump(self.entries, file, indent=1, default=float)
