"""One calibrated verdict over several levels: conformal p-values per level, combined so that the overall flag's
false-positive rate on unseen patients is at most ``alpha``, whatever the rule and the number of levels.

A level's p-value for a sample whose nearest-training similarity is ``s`` is its conformal p-value against the
level's null (``n`` unseen patients' similarities): ``p = (1 + #{null >= s}) / (1 + n)``. For an unseen patient
exchangeable with the null, ``P(p <= u) <= u``: "how unusual is this closeness among unseen patients". A
leave-one-out null (no holdout) stands in for unseen patients, so there the guarantee is only approximate.

A rule asks ``k`` of the ``L`` levels to flag (``any``: 1, ``all``: L, ``majority``: L // 2 + 1). A level flags
at ``p <= alpha * k / L``; by Markov's inequality ``P(at least k of L p-values <= c) <= L * c / k``, so at most
``alpha`` of unseen patients are flagged overall, under any dependence between the levels (Bonferroni for
``any``, the intersection-union test for ``all``, Rüger's combination in general). A sample's combined p-value,
``min(1, L / k * p_(k))`` with ``p_(k)`` its k-th smallest level p-value, is ``<= alpha`` exactly when it is flagged.

The guarantee is on average over the draw of the null. For one draw, a level flagging at ``p <= m / (n + 1)``
flags a share of unseen patients distributed as ``Beta(m, n + 1 - m)`` (continuous similarities), whose mean is
that cutoff; :meth:`Calibration.share_bound` bounds this null's share with 95% confidence (a larger null brings
it down towards the cutoff).

A null of ``n`` values cannot give a p-value below ``1 / (n + 1)``. When that is above a level's cutoff the
level is *under-resolved*: it flags at the smallest p it can (similarity above the whole null) and the report
states the false-positive bound this gives instead of ``alpha``; it never pretends to hold ``alpha``.

>>> needed = levels_needed("any", 2)
>>> cutoff = 0.1 * needed / 2                        # alpha = 0.1 over two levels: p <= 0.05 per level
>>> null = np.arange(99) / 100                       # 99 unseen patients
>>> threshold, used = calibrate(null, cutoff)        # flag above the 5th largest null value
>>> threshold, used, p_values(np.array([0.95, 0.96]), null).tolist()
(0.94, 0.05, [0.05, 0.04])
>>> combine(np.array([[0.04, 0.5]]), needed).tolist()  # Bonferroni: 2 x the smallest
[0.08]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

RULES = ("any", "all", "majority")
SHARE_CONFIDENCE = 0.95  # of the bound on one null's false-positive share
_EPS = 1e-9  # slack for p-value arithmetic in floating point (p-values are multiples of 1 / (n + 1))


def levels_needed(rule: str, count: int) -> int:
    """How many of ``count`` levels must flag a sample under ``rule``.

    >>> [levels_needed(rule, 3) for rule in RULES]
    [1, 3, 2]
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return {"any": 1, "all": count, "majority": count // 2 + 1}[rule]


def p_values(similarities: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Conformal p-value of each similarity against ``null``: ``(1 + #{null >= s}) / (1 + n)``."""
    ordered = np.sort(np.asarray(null, dtype=np.float64))
    at_least = len(ordered) - np.searchsorted(ordered, np.asarray(similarities, dtype=np.float64), side="left")
    return (1 + at_least) / (1 + len(ordered))


def combine(p: np.ndarray, needed: int) -> np.ndarray:
    """Combined p-value per row of ``p`` ``[N, L]`` when ``needed`` of the L levels must flag (Rüger):
    ``min(1, L / needed * p_(needed))``, valid under any dependence between the levels."""
    count = p.shape[1]
    return np.minimum(1.0, count / needed * np.sort(p, axis=1)[:, needed - 1])


def calibrate(null: np.ndarray, cutoff: float) -> tuple[float, float]:
    """``(threshold, used)``: a sample is flagged when its similarity is above ``threshold``, which is exactly
    when its p-value is ``<= used``; ``used`` is the largest achievable p-value ``<= cutoff``, or, when the
    null is too small for that, the smallest achievable one, ``1 / (n + 1)`` (threshold: the null maximum)."""
    descending = np.sort(np.asarray(null, dtype=np.float64))[::-1]
    allowed = max(1, math.floor(cutoff * (len(descending) + 1) + _EPS))  # p <= allowed / (n + 1)
    return float(descending[allowed - 1]), allowed / (len(descending) + 1)


def threshold_cutoff(null: np.ndarray, threshold: float) -> float:
    """The p-value cutoff an explicit ``threshold`` amounts to: every similarity above it has a p-value at most
    this, so at most this fraction of unseen patients exceed it."""
    null = np.asarray(null, dtype=np.float64)
    return (1 + int((null > threshold).sum())) / (1 + len(null))


def null_needed(cutoff: float) -> int:
    """The smallest null that can give a p-value ``<= cutoff``.

    >>> null_needed(0.005)  # alpha = 0.01 over two levels with rule "any"
    199
    """
    return max(1, math.ceil(1 / cutoff - 1 - _EPS))


@dataclass
class Calibration:
    """The thresholds of a verdict and what they guarantee. Build it with :meth:`fit`.

    Args:
        alpha: the requested bound on the fraction of unseen patients flagged overall.
        rule: ``"any"``, ``"all"`` or ``"majority"`` of the levels must flag.
        thresholds: per level, the similarity above which it flags.
        p_cutoffs: per level, the p-value cutoff its threshold amounts to (a flagged sample's p is at most this).
        given: the levels whose threshold was given explicitly rather than calibrated.
        null_sizes: per level, the number of null values.

    >>> nulls = {"voxel": np.linspace(0.5, 0.9, 20), "segmentation": np.linspace(0.1, 0.6, 20)}
    >>> calibration = Calibration.fit(nulls, alpha=0.01, rule="any")
    >>> calibration.under_resolved, round(calibration.false_positive_bound, 3)
    (['voxel', 'segmentation'], 0.095)
    """

    alpha: float
    rule: str
    thresholds: dict[str, float]
    p_cutoffs: dict[str, float]
    given: list[str]
    null_sizes: dict[str, int]

    @classmethod
    def fit(cls, nulls: dict[str, np.ndarray], alpha: float, rule: str, given: dict | None = None) -> Calibration:
        """Thresholds for ``nulls`` (level -> null similarities) such that at most ``alpha`` of unseen patients
        are flagged under ``rule``; ``given`` thresholds are kept as they are."""
        given = dict(given or {})
        cutoff = alpha * levels_needed(rule, len(nulls)) / len(nulls)
        thresholds, cutoffs = {}, {}
        for name, null in nulls.items():
            if name in given:
                thresholds[name], cutoffs[name] = float(given[name]), threshold_cutoff(null, given[name])
            else:
                thresholds[name], cutoffs[name] = calibrate(null, cutoff)
        return cls(alpha, rule, thresholds, cutoffs, sorted(given), {n: len(v) for n, v in nulls.items()})

    @property
    def needed(self) -> int:
        """How many levels must flag a sample."""
        return levels_needed(self.rule, len(self.thresholds))

    @property
    def level_cutoff(self) -> float:
        """The p-value cutoff per level that ``alpha`` asks for: ``alpha * needed / levels``."""
        return self.alpha * self.needed / len(self.thresholds)

    @property
    def under_resolved(self) -> list[str]:
        """Calibrated levels whose null is too small to give a p-value at or below :attr:`level_cutoff`."""
        return [name for name, used in self.p_cutoffs.items()
                if name not in self.given and used > self.level_cutoff + _EPS]

    @property
    def false_positive_bound(self) -> float:
        """Bound on the fraction of unseen patients the verdict flags: ``sum(p_cutoffs) / needed``; at most
        ``alpha`` unless a level is under-resolved or has an explicit threshold."""
        return min(1.0, round(sum(self.p_cutoffs.values()) / self.needed, 12))  # 12 digits: no float dust

    def share_bound(self, confidence: float = SHARE_CONFIDENCE) -> dict[str, float]:
        """Per calibrated level, the share of unseen patients it flags for this draw of its null, bounded with
        ``confidence`` over the draw: flagging at ``p <= m / (n + 1)`` flags a share distributed as
        ``Beta(m, n + 1 - m)`` (mean ``m / (n + 1)``), and this is its ``confidence`` quantile. A larger null
        brings it down towards the cutoff.

        >>> calibration = Calibration.fit({"voxel": np.linspace(0, 1, 60)}, alpha=0.05, rule="any")
        >>> calibration.p_cutoffs["voxel"] * 61, round(calibration.share_bound()["voxel"], 3)
        (3.0, 0.101)
        """
        bounds = {}
        for name, used in self.p_cutoffs.items():
            if name not in self.given:
                size = self.null_sizes[name]
                flagged_above = round(used * (size + 1))
                bounds[name] = float(stats.beta.ppf(confidence, flagged_above, size + 1 - flagged_above))
        return bounds

    def verdict(self, flags: list[bool]) -> bool:
        """The overall flag from the levels' flags."""
        return sum(flags) >= self.needed

    def to_dict(self) -> dict:
        smallest = max(1 / (n + 1) for n in self.null_sizes.values())
        return {"levels_needed": self.needed, "level_p_cutoff": self.level_cutoff, "p_cutoffs": self.p_cutoffs,
                "thresholds_given": self.given, "false_positive_bound": self.false_positive_bound,
                "under_resolved": self.under_resolved, "false_positive_share_bound": self.share_bound(),
                "share_bound_confidence": SHARE_CONFIDENCE,
                "smallest_resolvable_alpha": min(1.0, smallest * len(self.null_sizes) / self.needed),
                "null_needed": null_needed(self.level_cutoff)}

    def describe(self) -> str:
        """One readable paragraph: how the verdict is reached and what it guarantees."""
        count = len(self.thresholds)
        text = (f"verdict: {self.needed} of {count} level(s) at p <= {self.level_cutoff:.3g} (conformal p-values "
                f"against the null, corrected for {count} level(s) under rule {self.rule!r}); at most "
                f"{self.false_positive_bound:.3g} of unseen patients flagged overall, on average over the draw of "
                f"the null{self.spread()}")
        if self.given:
            text += f"; explicit thresholds for {', '.join(self.given)}"
        return text + (f". {self.shortfall()}" if self.under_resolved else "")

    def spread(self) -> str:
        """How far this null's false-positive share may be from the average, in words (empty when no level is
        calibrated)."""
        bounds = self.share_bound()
        if not bounds:
            return ""
        shares = ", ".join(f"{name} {value:.3g} (n={self.null_sizes[name]})" for name, value in bounds.items())
        return (f"; with this null, each level flags at most this share of unseen patients with "
                f"{SHARE_CONFIDENCE:.0%} confidence: {shares} (a larger holdout brings it down to the cutoff)")

    def shortfall(self) -> str:
        """What an under-resolved null cannot do and what it can (empty when every level is resolved)."""
        if not self.under_resolved:
            return ""
        info = self.to_dict()
        sizes = ", ".join(f"{name} n={self.null_sizes[name]}" for name in self.under_resolved)
        return (f"UNDER-RESOLVED: alpha={self.alpha} under rule {self.rule!r} needs p <= {self.level_cutoff:.3g} per "
                f"level, i.e. a null of at least {info['null_needed']} values ({sizes}); those levels flag only "
                f"above the null maximum (p <= {max(self.p_cutoffs[n] for n in self.under_resolved):.3g}), so the "
                f"false-positive bound is {self.false_positive_bound:.3g}, not {self.alpha}; the smallest alpha "
                f"these nulls resolve is {info['smallest_resolvable_alpha']:.3g} (use a larger holdout or training set)")
