"""The stop policy: when a replica rate, check after check, means training should stop.

Like Lightning's ``EarlyStopping`` logic, without a trainer: counters of consecutive bad checks per criterion, the
lowest rate so far, and why (if at all) it decided to stop; ``state_dict`` / ``load_state_dict`` round-trip them.

The ``"limit"`` criterion counts a check as bad when memorization is *detected*: the lower bound of its replica
rate (``low``, e.g. ``relict/replica_rate_low``) is above ``max_replica_rate``; a rate given without a bound is
taken as exact. ``"rising"`` follows the point estimates (a trend, not a verdict).

>>> policy = StopPolicy(max_replica_rate=0.1, patience=2)
>>> checks = [(0.25, 0.05), (0.5, 0.2), (0.5, 0.2)]  # (replica rate, its lower bound) per check
>>> [policy.update(rate, epoch, low).name for epoch, (rate, low) in enumerate(checks)]
['NOT_STOPPED', 'NOT_STOPPED', 'RATE_ABOVE_LIMIT']
>>> policy.message
'replica rate 0.50 (lower bound 0.20) > 0.10 for 2 checks at epoch 2'
"""

from __future__ import annotations

import math
from enum import Enum

from ..validation import check_number, check_probability

STOP_CRITERIA = ("limit", "rising")


class StopReason(Enum):
    """Why the monitor asked training to stop (like Lightning's ``EarlyStoppingReason``)."""

    NOT_STOPPED = 0
    RATE_ABOVE_LIMIT = 1
    RATE_RISING = 2


class StopPolicy:
    """Decide, one replica rate at a time, whether training should stop.

    Args:
        max_replica_rate: the rate whose lower bound, when above it, counts a check against the model (criterion
            ``"limit"``).
        patience: consecutive bad checks (of one criterion) before stopping.
        min_delta: for ``"rising"``, how far above its lowest value the rate must be to count as rising.
        stop_on: criteria that stop training, among ``"limit"`` and ``"rising"``; default ``("limit",)`` when
            ``max_replica_rate`` is set, else none.
    """

    def __init__(self, max_replica_rate: float | None = None, patience: int = 1, min_delta: float = 0.0,
                 stop_on=None) -> None:
        if max_replica_rate is not None:
            check_probability("max_replica_rate", max_replica_rate, closed=True)
        self.patience = check_number("patience", patience, low=1, integer=True)
        self.min_delta = check_number("min_delta", min_delta, low=0)
        if stop_on is None:
            stop_on = ("limit",) if max_replica_rate is not None else ()
        stop_on = (stop_on,) if isinstance(stop_on, str) else tuple(stop_on)
        unknown = set(stop_on) - set(STOP_CRITERIA)
        if unknown:
            raise ValueError(f"stop_on must be among {STOP_CRITERIA}, got {sorted(unknown)}")
        if "limit" in stop_on and max_replica_rate is None:
            raise ValueError("stop_on='limit' needs max_replica_rate")
        self.max_replica_rate, self.stop_on = max_replica_rate, stop_on
        self.wait = dict.fromkeys(STOP_CRITERIA, 0)
        self.lowest_rate = math.inf
        self.reason, self.message = StopReason.NOT_STOPPED, None

    def update(self, rate: float, epoch: int, low: float | None = None) -> StopReason:
        """Count the check with replica rate ``rate`` (lower bound ``low``, default: ``rate``) at ``epoch``; the
        reason to stop now (or ``NOT_STOPPED``)."""
        bound = "" if low is None else f" (lower bound {low:.2f})"
        low = rate if low is None else low
        bad = {"limit": self.max_replica_rate is not None and low > self.max_replica_rate,
               "rising": rate > self.lowest_rate + self.min_delta}
        for criterion in STOP_CRITERIA:
            self.wait[criterion] = self.wait[criterion] + 1 if bad[criterion] else 0
        self.lowest_rate = min(self.lowest_rate, rate)
        if "limit" in self.stop_on and self.wait["limit"] >= self.patience:
            self.reason = StopReason.RATE_ABOVE_LIMIT
            self.message = (f"replica rate {rate:.2f}{bound} > {self.max_replica_rate:.2f} for "
                            f"{_checks(self.wait['limit'])} at epoch {epoch}")
            return self.reason
        if "rising" in self.stop_on and self.wait["rising"] >= self.patience:
            self.reason = StopReason.RATE_RISING
            self.message = (f"replica rate {rate:.2f} above its lowest {self.lowest_rate:.2f} (+{self.min_delta}) "
                            f"for {_checks(self.wait['rising'])} at epoch {epoch}")
            return self.reason
        return StopReason.NOT_STOPPED

    def state_dict(self) -> dict:
        """Counters, lowest rate and stop state (plain Python values)."""
        return {"wait": dict(self.wait), "lowest_rate": self.lowest_rate, "stop_reason": self.reason.name,
                "stop_message": self.message}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; keys missing from an older state keep their fresh values."""
        self.wait = {**dict.fromkeys(STOP_CRITERIA, 0), **state.get("wait", {})}
        self.lowest_rate = state.get("lowest_rate", math.inf)
        self.reason = StopReason[state.get("stop_reason", StopReason.NOT_STOPPED.name)]
        self.message = state.get("stop_message")


def _checks(count: int) -> str:
    return f"{count} check{'s' * (count != 1)}"
