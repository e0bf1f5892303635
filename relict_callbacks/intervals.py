"""Exact (Clopper-Pearson) bounds on a replica rate estimated from ``n`` samples, and the sample count that can
certify a limit at all.

A check that flags ``k`` of ``n`` samples estimates the model's true replica rate; ``rate_bounds`` gives the
one-sided lower and upper bounds, each holding with probability ``confidence`` (together a two-sided interval
of ``2 * confidence - 1``). A rate is certified below a limit when its upper bound is; memorization is detected
when the lower bound is above it.

>>> low, high = rate_bounds(0, 8)          # 0 of 8: the true rate may still be 31%
>>> round(low, 3), round(high, 3)
(0.0, 0.312)
>>> samples_to_certify(0.10)               # 0 of n certifies 0.10 at 95% only from n = 29 on
29
"""

from __future__ import annotations

import math

from scipy import stats

from .validation import check_probability


def rate_bounds(flagged: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """One-sided exact (Clopper-Pearson) lower and upper bounds on a rate from ``flagged`` of ``total``."""
    check_probability("confidence", confidence)
    if total < 1 or not 0 <= flagged <= total:
        raise ValueError(f"rate_bounds needs 0 <= flagged <= total and total >= 1, got {flagged} of {total}")
    low = 0.0 if flagged == 0 else float(stats.beta.ppf(1 - confidence, flagged, total - flagged + 1))
    high = 1.0 if flagged == total else float(stats.beta.ppf(confidence, flagged + 1, total - flagged))
    return low, high


def samples_to_certify(limit: float, confidence: float = 0.95) -> int:
    """The fewest samples whose check, with none flagged, puts the upper bound at or below ``limit``."""
    check_probability("limit", limit)
    check_probability("confidence", confidence)
    return math.ceil(math.log(1 - confidence) / math.log(1 - limit) - 1e-12)
