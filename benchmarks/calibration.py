"""The overall verdict's false-positive rate and the aligned segmentation level, before and after, on phantoms.

Per phantom flavour (2D head CT and MRA, seeds the tests do not use): a training set, a holdout of unseen
patients (calibration), many more unseen patients (negatives) and near-copies of training patients (positives:
every ``PERTURBATIONS`` kind, plus mirrored-and-shifted copies). It prints

1. per rule over voxel + segmentation, the fraction of unseen patients flagged overall and of copies caught,
   *before* (each level at its own ``1 - alpha`` null quantile, segmentation unaligned: what the project did) and
   *after* (conformal p-values combined by the rule, segmentation aligned to the voxel match), next to ``alpha``
   and the bound the report states;
2. the segmentation level alone at ``p <= alpha``, unaligned (best Dice over the bank: the old level), with its
   own mirror/shift search (no voxel level) and aligned to the voxel match: Dice of mirrored copies, unseen
   patients flagged, copies caught, balanced accuracy, and its search time while scoring as a ratio to the
   unaligned level's.

Run: ``python benchmarks/calibration.py [--train 60 --holdout 100 --unseen 400 --copies 8 --alpha 0.05]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import relict_callbacks as rc
from relict_callbacks.calibration import levels_needed
from relict_callbacks.data import PERTURBATIONS, make_phantoms, make_replica

RULES = ("any", "all", "majority")


class TimedSegmentation(rc.SegmentationLevel):
    """The segmentation level, adding up the seconds its searches take."""

    seconds = 0.0

    def nearest(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().nearest(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def scored(levels, train, holdout, samples, alpha: float):
    """The bank of ``levels``, the report on ``samples`` and the seconds its segmentation searches took."""
    bank = rc.ReferenceBank.build(train, levels, holdout=holdout, progress=False)
    timed = next((level for level in levels if isinstance(level, TimedSegmentation)), None)
    if timed is not None:
        timed.seconds = 0.0
    report = rc.ReplicaScorer(bank, alpha=alpha).score(samples)
    return bank, report, None if timed is None else timed.seconds


def old_flags(report, alpha: float, name: str) -> np.ndarray:
    """A level's flags at the old per-level threshold: the ``1 - alpha`` quantile of its null."""
    threshold = float(np.quantile(report.nulls[name], 1 - alpha, method="higher"))
    return report.similarities(name) > threshold


def run(kind: str, args) -> None:
    train = make_phantoms(args.train, kind, 2, args.size, seed=300, id_prefix="train")
    holdout = make_phantoms(args.holdout, kind, 2, args.size, seed=301, id_prefix="holdout")
    unseen = make_phantoms(args.unseen, kind, 2, args.size, seed=302, id_prefix="unseen")
    rng = np.random.default_rng(303)
    sources = [train[int(i)] for i in rng.integers(args.train, size=args.copies * (len(PERTURBATIONS) + 1))]
    kinds = [k for k in PERTURBATIONS for _ in range(args.copies)] + ["flip+shift"] * args.copies
    copies = [make_replica(make_replica(src, "flip"), "shift", seed=i) if k == "flip+shift" else
              make_replica(src, k, seed=i) for i, (src, k) in enumerate(zip(sources, kinds))]
    samples, is_copy = copies + unseen, np.array([True] * len(copies) + [False] * len(unseen))
    mirrored = np.array([k.startswith("flip") for k in kinds] + [False] * len(unseen))

    _, voxel, _ = scored([rc.VoxelLevel()], train, holdout, samples, args.alpha)
    _, plain, t_plain = scored([TimedSegmentation(flips=(), max_shift=0)], train, holdout, samples, args.alpha)
    _, own, t_own = scored([TimedSegmentation()], train, holdout, samples, args.alpha)
    both_bank, both, t_aligned = scored([rc.VoxelLevel(), TimedSegmentation()], train, holdout, samples, args.alpha)

    print(f"\n{kind} 2D {args.size}px: {args.train} training, {args.holdout} holdout, {args.unseen} unseen patients, "
          f"{len(copies)} copies ({', '.join(PERTURBATIONS)}, flip+shift); alpha = {args.alpha}")
    print(f"  {'rule':<9} {'unseen flagged: before':>22} {'after':>7} {'stated bound':>13}   "
          f"{'copies caught: before':>21} {'after':>7}")
    before_levels = np.stack([old_flags(voxel, args.alpha, "voxel"), old_flags(plain, args.alpha, "segmentation")], 1)
    for rule in RULES:
        report = rc.ReplicaScorer(both_bank, alpha=args.alpha, rule=rule).score(samples) if rule != "any" else both
        before = before_levels.sum(1) >= levels_needed(rule, 2)
        after = np.array([r.is_replica for r in report.records])
        print(f"  {rule:<9} {before[~is_copy].mean():>22.3f} {after[~is_copy].mean():>7.3f} "
              f"{report.calibration.false_positive_bound:>13.3g}   {before[is_copy].mean():>21.3f} "
              f"{after[is_copy].mean():>7.3f}")

    print(f"  segmentation level alone at p <= {args.alpha}:")
    print(f"  {'variant':<26} {'Dice of mirrored copies':>23} {'unseen flagged':>15} {'copies caught':>14} "
          f"{'balanced acc':>13} {'time ratio':>11}")
    variants = (("unaligned (before)", plain, t_plain), ("own mirror/shift search", own, t_own),
                ("aligned to voxel match", both, t_aligned))
    for name, report, seconds in variants:
        dice = report.similarities("segmentation")
        flagged = np.array([r.levels["segmentation"].p_value <= args.alpha for r in report.records])
        accuracy = 0.5 * (flagged[is_copy].mean() + 1 - flagged[~is_copy].mean())
        print(f"  {name:<26} {dice[mirrored].mean():>23.3f} {flagged[~is_copy].mean():>15.3f} "
              f"{flagged[is_copy].mean():>14.3f} {accuracy:>13.3f} {seconds / t_plain:>11.2f}")
    print(f"  (time ratio: the level's search time while scoring, over the unaligned level's {t_plain:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--unseen", type=int, default=400)
    parser.add_argument("--copies", type=int, default=8, help="copies per kind")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    for kind in ("head_ct", "mra"):
        run(kind, args)


if __name__ == "__main__":
    main()
