"""ReplicaScorer: score synthetic samples against a ReferenceBank; ReplicaReport: what was found."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from .atomic import atomic_csv, atomic_write
from .bank import ReferenceBank
from .calibration import RULES, Calibration, combine, p_values
from .heartbeat import beat
from .intervals import rate_bounds
from .search import device_budget as device_budget_bytes
from .torch_modes import full_precision
from .items import ItemError, iter_batches, iter_raw
from .validation import check_number, check_probability


@dataclass
class LevelMatch:
    """One sample at one level: similarity to its nearest training image, which one, under which transform
    (how the training image was mirrored/moved to match), the conformal ``p_value`` of that similarity against
    the level's null (the fraction of unseen patients at least as close) and the level's flag."""

    similarity: float
    nearest_id: str
    nearest_index: int
    is_replica: bool
    transform: str = "identity"
    p_value: float = 1.0


@dataclass
class SampleRecord:
    """One sample: its per-level matches, the overall verdict under the scorer's rule and the combined
    ``p_value`` of its level p-values (see :mod:`relict_callbacks.calibration`; ``<= alpha`` when flagged by
    calibrated thresholds)."""

    index: int
    id: str
    is_replica: bool
    levels: dict[str, LevelMatch]
    p_value: float = 1.0


@dataclass
class RankTest:
    """Dataset-level test that samples sit closer to the training set than unseen patients do (Wilcoxon
    rank-sum, one-sided): ``z`` > 0 means closer; ``p`` is its p-value."""

    z: float
    p: float


@dataclass
class ReplicaReport:
    """Result of :meth:`ReplicaScorer.score`."""

    records: list[SampleRecord]
    thresholds: dict[str, float]
    rule: str
    alpha: float
    null_source: str
    tests: dict[str, RankTest]
    nulls: dict[str, np.ndarray] = field(repr=False)
    confidence: float = 0.95
    calibration: Calibration | None = None

    @property
    def replica_rate(self) -> float:
        """Fraction of samples flagged as replicas under ``rule``."""
        return float(np.mean([r.is_replica for r in self.records]))

    @property
    def replica_rate_bounds(self) -> tuple[float, float]:
        """Exact one-sided lower and upper bounds on the true replica rate, each at ``confidence``
        (see :func:`relict_callbacks.intervals.rate_bounds`)."""
        return rate_bounds(sum(r.is_replica for r in self.records), len(self.records), self.confidence)

    @property
    def level_rates(self) -> dict[str, float]:
        """Fraction of samples flagged at each level."""
        return {name: float(np.mean([r.levels[name].is_replica for r in self.records])) for name in self.thresholds}

    def similarities(self, level: str) -> np.ndarray:
        """Nearest-training similarity of every sample at ``level``."""
        return np.array([r.levels[level].similarity for r in self.records])

    def metrics(self, prefix: str = "relict") -> dict[str, float]:
        """Flat metrics with the keys the callbacks log (``relict/replica_rate``, ``relict/voxel/copy_z``, ...)."""
        low, high = self.replica_rate_bounds
        out = {f"{prefix}/replica_rate": self.replica_rate, f"{prefix}/replica_rate_low": low,
               f"{prefix}/replica_rate_high": high}
        for name, rate in self.level_rates.items():
            sims = self.similarities(name)
            out.update({f"{prefix}/{name}/replica_rate": rate, f"{prefix}/{name}/nn_similarity_mean": float(sims.mean()),
                        f"{prefix}/{name}/nn_similarity_max": float(sims.max()),
                        f"{prefix}/{name}/copy_z": self.tests[name].z})
        return out

    def to_dict(self) -> dict:
        null_summary = {name: {"n": int(len(v)), "mean": float(np.mean(v)), "max": float(np.max(v))}
                        for name, v in self.nulls.items()}
        low, high = self.replica_rate_bounds
        return {"replica_rate": self.replica_rate, "replica_rate_bounds": [low, high], "confidence": self.confidence,
                "level_rates": self.level_rates, "thresholds": self.thresholds,
                "rule": self.rule, "alpha": self.alpha,
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
                "null_source": self.null_source, "null": null_summary,
                "tests": {name: asdict(test) for name, test in self.tests.items()},
                "records": [asdict(record) for record in self.records]}

    def to_json(self, path) -> None:
        """Write the whole report (summary, tests, per-sample records) as JSON, atomically."""
        with atomic_write(path) as file:
            json.dump(self.to_dict(), file, indent=1)

    def csv_rows(self) -> Iterator[list]:
        """The rows :meth:`to_csv` writes, header first, then one per sample: verdict and combined p-value, then
        per level similarity, nearest id, transform, p-value and flag."""
        names = list(self.thresholds)
        columns = ("similarity", "nearest_id", "transform", "p_value", "is_replica")
        yield ["index", "id", "is_replica", "p_value"] + [f"{n}_{c}" for n in names for c in columns]
        for r in self.records:
            row = [r.index, r.id, r.is_replica, f"{r.p_value:.6g}"]
            for n in names:
                m = r.levels[n]
                row += [f"{m.similarity:.6f}", m.nearest_id, m.transform, f"{m.p_value:.6g}", m.is_replica]
            yield row

    def to_csv(self, path) -> None:
        """Write :meth:`csv_rows` (one row per sample) as a CSV file, atomically."""
        atomic_csv(path, self.csv_rows())

    def summary(self) -> str:
        """A few readable lines: overall rate, then per level rate, threshold, nearest similarity and test."""
        low, high = self.replica_rate_bounds
        lines = [f"replica rate {self.replica_rate:.3f} ({sum(r.is_replica for r in self.records)}/"
                 f"{len(self.records)} samples; {self.confidence:.0%} bounds {low:.3f}-{high:.3f}, exact; "
                 f"rule={self.rule}, null={self.null_source}, alpha={self.alpha})"]
        for name, rate in self.level_rates.items():
            sims, test = self.similarities(name), self.tests[name]
            cutoff = "" if self.calibration is None else f" (p<={self.calibration.p_cutoffs[name]:.3g})"
            lines.append(f"  {name:<13} rate {rate:.3f}  threshold {self.thresholds[name]:.4f}{cutoff}  "
                         f"nn-similarity mean {sims.mean():.4f} max {sims.max():.4f}  copy z {test.z:+.2f} (p={test.p:.2g})")
        if self.calibration is not None:
            lines.append("  " + self.calibration.describe())
        return "\n".join(lines)


def check_scoring_options(alpha, rule: str, confidence, thresholds) -> None:
    """Refuse a bad ``alpha``, ``rule``, ``confidence`` or threshold value, naming the option (the scorer's checks,
    also run by the monitor before its bank exists)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    check_probability("alpha", alpha)
    check_probability("confidence", confidence)
    for name, value in (thresholds or {}).items():
        check_number(f"thresholds[{name!r}]", value)


class ReplicaScorer:
    """Score synthetic samples against a :class:`ReferenceBank` at every level of the bank.

    Args:
        bank: the reference bank (training set embedded per level, with calibration nulls).
        alpha: bound on the fraction of unseen patients flagged overall: each level gives a conformal p-value
            against its null (unseen patients -> nearest training image), a level flags at
            ``p <= alpha * needed / levels`` and the rule's ``needed`` levels must flag (see
            :mod:`relict_callbacks.calibration`); ``report.thresholds`` are the similarities this amounts to. A
            null too small for that is said so (a warning, ``report.calibration``), and its level flags above
            the null maximum.
        rule: ``"any"``, ``"all"`` or ``"majority"`` of the levels must flag a sample for it to be a replica.
        thresholds: explicit ``{level: threshold}`` overriding the calibrated ones (the report's
            ``calibration`` then states the false-positive bound they amount to on the null).
        search: ``"exact"`` (chunked matmul) or a faiss index kind (``"flat"``, ``"ivf"``, ``"hnsw"``) for the
            dot-product levels (voxel, feature); the segmentation level always searches exactly.
        confidence: confidence of each one-sided exact bound on the replica rate (``report.replica_rate_bounds``,
            metrics ``relict/replica_rate_low``/``_high``).
        batch_size, device: how samples are streamed and embedded, and where they are embedded and searched.
        query_block: samples searched together in one pass over the bank (memory: block x row size).
        device_budget: the bytes of bank rows kept resident on ``device`` (default: a quarter of a CUDA device's
            memory and at most half of what is free on it, or a quarter of the RAM on the CPU, where float16 rows
            are ranked in bfloat16 on CPUs that multiply it in hardware, else in float32, and smooth images by
            their low frequencies only: 125 MiB in bfloat16 for 2,000 x 64³, rows of other kinds 2 or 4 bytes a
            value);
            rows beyond it are streamed from host memory through two pinned staging buffers (CUDA) or read
            memory-mapped and converted (CPU) at every search. 0 keeps nothing resident.

    >>> import relict_callbacks as rc
    >>> train = rc.data.make_phantoms(10, ndim=2, size=32)
    >>> bank = rc.ReferenceBank.build(train, levels=[rc.VoxelLevel(grid=32)], progress=False)
    >>> copy = rc.data.make_replica(train[3], "noise")
    >>> report = rc.ReplicaScorer(bank, alpha=0.1).score([copy])
    >>> report.records[0].levels["voxel"].nearest_id, report.replica_rate
    ('head_ct-0003', 1.0)
    """

    def __init__(self, bank: ReferenceBank, alpha: float = 0.01, rule: str = "any", thresholds=None, *,
                 search: str = "exact", confidence: float = 0.95, batch_size: int = 16, query_block: int = 256,
                 device="cpu", device_budget: int | None = None) -> None:
        check_scoring_options(alpha, rule, confidence, thresholds)
        self.confidence = confidence
        names = [level.name for level in bank.levels]
        unknown = set(thresholds or {}) - set(names)
        if unknown:
            raise ValueError(f"thresholds for unknown level(s) {sorted(unknown)}; the bank has {names}")
        self.bank, self.alpha, self.rule, self.device = bank, alpha, rule, device
        self.batch_size, self.query_block = batch_size, query_block
        self.calibration = Calibration.fit({name: bank.nulls[name] for name in names}, alpha, rule, thresholds)
        self.thresholds = self.calibration.thresholds
        if self.calibration.under_resolved:
            warnings.warn(self.calibration.shortfall(), stacklevel=2)
        self.device_budget = None if device_budget is None else device_budget_bytes(device, device_budget)
        self.indexes = {}
        if search != "exact":
            self.indexes = {level.name: level.build_index(bank.arrays[level.name], search) for level in bank.levels}

    def _samples(self, samples, labels):
        if labels is None:
            return samples
        return ({"image": image, "label": label, "id": item_id}
                for (image, _, item_id), label in zip(iter_raw(samples), labels, strict=True))

    def _embedded(self, batch: list, on_error):
        """``(items, {level: rows})`` for ``batch``: once, the whole batch; if a level cannot embed it and
        ``on_error`` is given, item by item, passing each item a level cannot embed to ``on_error`` (if every
        item can be embedded alone, the batch's error is raised: it is about the items together)."""
        try:
            rows = {level.name: level.embed(batch, self.device) for level in self.bank.levels}
        except ItemError as error:
            if on_error is None:
                raise
            batch_error = error
        else:
            yield batch, rows
            return
        alone = []  # only a batch holding a bad item is embedded again, one item at a time
        for item in batch:
            try:
                alone.append(([item], {level.name: level.embed([item], self.device) for level in self.bank.levels}))
            except ItemError as error:
                on_error(item.id, error)
        if len(alone) == len(batch):
            raise batch_error
        yield from alone

    @full_precision()  # float32 scores, even when called inside autocast
    def score(self, samples, labels=None, *, on_error=None) -> ReplicaReport:
        """Score ``samples`` (Tensor ``[N, C, *spatial]`` or iterable of items); ``labels`` are optional masks
        for them (for the segmentation level), aligned with the samples.

        A sample that cannot be scored (NaN, constant, another rank or channel count than the bank, a level
        cannot embed it) raises an :class:`~relict_callbacks.items.ItemError` naming it; with ``on_error``, it
        is passed as ``on_error(sample_id, error)`` and left out of the report, and the others are scored.

        >>> import relict_callbacks as rc, torch
        >>> bank = rc.ReferenceBank.build(rc.data.make_phantoms(6, ndim=2, size=16), [rc.VoxelLevel(grid=16)],
        ...                               progress=False)
        >>> samples = torch.rand(3, 1, 16, 16)
        >>> samples[1] = 0.5  # constant: NCC is undefined
        >>> bad = {}
        >>> report = rc.ReplicaScorer(bank, alpha=0.2).score(samples, on_error=bad.__setitem__)
        >>> [record.id for record in report.records], list(bad)
        (['0', '2'], ['1'])
        """
        rows = {level.name: {} for level in self.bank.levels}
        ids = []
        batches = iter_batches(self._samples(samples, labels), self.batch_size, name="sample",
                               check=self.bank.check_compatible, on_error=on_error)
        for batch in batches:
            for items, embedded in self._embedded(batch, on_error):
                ids += [item.id for item in items]
                for name, arrays in embedded.items():
                    for key, array in arrays.items():
                        rows[name].setdefault(key, []).append(array)
        if not ids:
            raise ItemError("no samples to score")
        queries = {name: {key: np.concatenate(parts) for key, parts in level_rows.items()}
                   for name, level_rows in rows.items()}
        found = {name: [] for name in queries}
        for start in range(0, len(ids), self.query_block):  # one pass over the bank per block of queries
            block = {name: {key: array[start : start + self.query_block] for key, array in query.items()}
                     for name, query in queries.items()}
            for name, nearest in self.bank.nearest_levels(block, self.device, indexes=self.indexes,
                                                             budget=self.device_budget).items():
                found[name].append(nearest)
            beat()
        sims = {name: np.concatenate([f.similarity for f in parts]) for name, parts in found.items()}
        indices = {name: np.concatenate([f.index for f in parts]) for name, parts in found.items()}
        transforms = {name: [t for f in parts for t in f.transform] for name, parts in found.items()}
        names = list(self.thresholds)
        p = np.stack([p_values(sims[name], self.bank.nulls[name]) for name in names], axis=1)
        combined = combine(p, self.calibration.needed)
        records = []
        for i, sample_id in enumerate(ids):
            levels = {}
            for column, name in enumerate(names):
                sim, j = float(sims[name][i]), int(indices[name][i])
                levels[name] = LevelMatch(sim, self.bank.ids[j], j, sim > self.thresholds[name], transforms[name][i],
                                          float(p[i, column]))
            verdict = self.calibration.verdict([m.is_replica for m in levels.values()])
            records.append(SampleRecord(i, sample_id, verdict, levels, float(combined[i])))
        tests = {}
        for name, null in self.bank.nulls.items():
            result = stats.ranksums(sims[name], null, alternative="greater")
            tests[name] = RankTest(float(result.statistic), float(result.pvalue))
        return ReplicaReport(records, dict(self.thresholds), self.rule, self.alpha, self.bank.null_source, tests,
                             {name: np.asarray(self.bank.nulls[name]) for name in names}, self.confidence,
                             self.calibration)
