"""One calibrated verdict: conformal p-values per level, combined by the rule, at most alpha of unseen patients
flagged overall; nulls too small for alpha are said so; explicit thresholds override per level."""

import csv
import json

import numpy as np
import pytest

import relict_callbacks as rc
from relict_callbacks.calibration import Calibration, combine, levels_needed, p_values
from relict_callbacks.data import make_phantoms, make_replica
from relict_callbacks.intervals import rate_bounds

ALPHA = 0.1


@pytest.fixture(scope="module")
def unseen():
    """A bank of 40 training heads (voxel + segmentation) calibrated on 99 unseen ones, and 300 more unseen."""
    train = make_phantoms(40, "head_ct", ndim=2, size=32, seed=70)
    holdout = make_phantoms(99, "head_ct", ndim=2, size=32, seed=71)
    bank = rc.ReferenceBank.build(train, [rc.VoxelLevel(grid=32), rc.SegmentationLevel(grid=32)], holdout=holdout,
                                  progress=False)
    return bank, make_phantoms(300, "head_ct", ndim=2, size=32, seed=72)


@pytest.mark.parametrize("rule", ["any", "all", "majority"])
def test_unseen_patients_are_flagged_at_most_alpha_overall_for_every_rule(unseen, rule):
    bank, fresh = unseen
    report = rc.ReplicaScorer(bank, alpha=ALPHA, rule=rule).score(fresh)
    flagged = sum(r.is_replica for r in report.records)
    assert report.calibration.false_positive_bound <= ALPHA and not report.calibration.under_resolved
    # the observed rate is consistent with <= alpha: even its 99% lower bound is not above it
    assert rate_bounds(flagged, len(fresh), 0.99)[0] <= ALPHA, f"{rule}: {flagged}/{len(fresh)} unseen flagged"
    assert all((r.p_value <= ALPHA) == r.is_replica for r in report.records)
    # each level at alpha without a correction (what thresholds per level used to do) flags far more with "any"
    uncorrected = sum(any(m.p_value <= ALPHA for m in r.levels.values()) for r in report.records)
    assert rate_bounds(uncorrected, len(fresh), 0.99)[0] > ALPHA, f"uncorrected: {uncorrected}/{len(fresh)}"


def test_thresholds_are_the_similarities_of_the_corrected_p_cutoff(unseen):
    bank, fresh = unseen
    report = rc.ReplicaScorer(bank, alpha=ALPHA, rule="any").score(fresh[:40])
    for name, null in report.nulls.items():
        assert report.calibration.p_cutoffs[name] == pytest.approx(ALPHA / 2)  # Bonferroni over two levels
        assert report.thresholds[name] == np.sort(null)[-5]  # p <= 5/100: above the 5th largest of 99
        for record in report.records:
            match = record.levels[name]
            assert match.p_value == pytest.approx((1 + (null >= match.similarity).sum()) / (1 + len(null)))
            assert match.is_replica == (match.similarity > report.thresholds[name]) == (match.p_value <= ALPHA / 2)
    all_levels = rc.ReplicaScorer(bank, alpha=ALPHA, rule="all")
    assert all_levels.calibration.p_cutoffs == {"voxel": pytest.approx(ALPHA), "segmentation": pytest.approx(ALPHA)}


def test_combined_p_value_is_at_most_alpha_exactly_when_enough_levels_flag():
    rng = np.random.default_rng(0)
    nulls = {name: rng.random(199) for name in ("voxel", "feature", "segmentation")}
    sims = rng.random((500, 3)) ** 0.2  # skewed towards the top of the nulls
    p = np.stack([p_values(sims[:, i], null) for i, null in enumerate(nulls.values())], axis=1)
    for rule in ("any", "all", "majority"):
        calibration = Calibration.fit(nulls, 0.05, rule)
        flags = sims > np.array(list(calibration.thresholds.values()))
        verdicts = [calibration.verdict(list(row)) for row in flags]
        assert verdicts == list(combine(p, levels_needed(rule, 3)) <= 0.05), rule
        assert 0 < sum(verdicts) < 500 and calibration.false_positive_bound <= 0.05
    assert levels_needed("majority", 3) == 2 and levels_needed("majority", 2) == 2


def test_a_null_too_small_for_alpha_is_said_and_flags_above_its_maximum(tmp_path):
    train = make_phantoms(12, "head_ct", ndim=2, size=32, seed=80)
    holdout = make_phantoms(20, "head_ct", ndim=2, size=32, seed=81)
    bank = rc.ReferenceBank.build(train, [rc.VoxelLevel(grid=32), rc.SegmentationLevel(grid=32)], holdout=holdout,
                                  progress=False)
    with pytest.warns(UserWarning, match=r"UNDER-RESOLVED: alpha=0.01 .* null of at least 199 values"):
        scorer = rc.ReplicaScorer(bank, alpha=0.01)
    report = scorer.score([make_replica(train[3], "noise"), make_phantoms(1, "head_ct", 2, 32, seed=82)[0]])
    calibration = report.to_dict()["calibration"]
    assert calibration["under_resolved"] == ["voxel", "segmentation"] and calibration["null_needed"] == 199
    assert calibration["smallest_resolvable_alpha"] == pytest.approx(2 / 21)
    assert calibration["false_positive_bound"] == pytest.approx(2 / 21)  # honest: not 0.01
    assert report.thresholds == {name: pytest.approx(null.max()) for name, null in report.nulls.items()}
    assert report.records[0].is_replica  # the copy is still caught, above every null (an unseen patient may be
    # too: with 20 holdout patients per level that happens with probability up to 2/21, the bound reported above)
    assert report.records[0].p_value == pytest.approx(2 / 21)  # the best these nulls can say, above 0.01
    assert "UNDER-RESOLVED" in report.summary()


def test_explicit_thresholds_override_per_level_and_their_bound_is_reported(unseen):
    bank, fresh = unseen
    null = bank.nulls["voxel"]
    given = float(np.sort(null)[-20])  # 19 of 99 unseen patients above it
    scorer = rc.ReplicaScorer(bank, alpha=ALPHA, thresholds={"voxel": given})
    assert scorer.thresholds["voxel"] == given and scorer.calibration.given == ["voxel"]
    assert scorer.calibration.p_cutoffs["voxel"] == pytest.approx(20 / 100)
    assert scorer.calibration.false_positive_bound == pytest.approx(0.2 + 0.05)
    report = scorer.score(fresh[:30])
    assert all(r.levels["voxel"].is_replica == (r.levels["voxel"].similarity > given) for r in report.records)
    assert "explicit thresholds for voxel" in report.summary()


def test_p_values_reach_json_csv_and_summary(unseen, tmp_path):
    bank, fresh = unseen
    train_copy = make_replica(make_phantoms(40, "head_ct", ndim=2, size=32, seed=70)[7], "flip")
    report = rc.ReplicaScorer(bank, alpha=ALPHA).score([train_copy] + fresh[:3])
    report.to_json(tmp_path / "r.json")
    report.to_csv(tmp_path / "r.csv")
    saved = json.loads((tmp_path / "r.json").read_text())
    first = saved["records"][0]
    assert first["is_replica"] and first["p_value"] == pytest.approx(2 / 100)  # 2 x the smallest p, 1/100
    assert first["levels"]["voxel"]["p_value"] == pytest.approx(1 / 100)
    assert saved["calibration"]["levels_needed"] == 1 and saved["calibration"]["false_positive_bound"] <= ALPHA
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert float(rows[0]["p_value"]) == pytest.approx(0.02) and float(rows[0]["voxel_p_value"]) == pytest.approx(0.01)
    assert rows[0]["voxel_transform"].startswith("flip1") and rows[0]["segmentation_transform"].startswith("flip1")
    assert "(p<=0.05)" in report.summary() and "at most 0.1 of unseen patients flagged overall" in report.summary()


@pytest.mark.parametrize("size", [60, 400])
def test_one_nulls_false_positive_share_is_bounded_as_the_calibration_says(size):
    """Over many draws of a null (uniform similarities, as any continuous one is after ranking), the share of unseen
    patients flagged averages at most alpha, and exceeds ``share_bound()`` in 5% of draws; a larger null brings the
    bound down towards alpha."""
    rng = np.random.default_rng(size)
    shares = []
    for _ in range(4000):
        calibration = Calibration.fit({"voxel": rng.uniform(size=size)}, alpha=0.05, rule="any")
        shares.append(1 - calibration.thresholds["voxel"])  # the share of uniform unseen similarities above it
    shares, bound = np.array(shares), calibration.share_bound()["voxel"]
    assert shares.mean() == pytest.approx(calibration.p_cutoffs["voxel"], abs=0.002) and shares.mean() <= 0.05
    assert (shares > bound).mean() == pytest.approx(0.05, abs=0.012)
    assert bound == pytest.approx({60: 0.101, 400: 0.068}[size], abs=0.001)
