"""The stop policy and the checkpoint choice on their own, table-driven (like Lightning's test_early_stopping.py)."""

import math

import pytest

from relict_callbacks.monitor import Check, StopReason
from relict_callbacks.intervals import rate_bounds
from relict_callbacks.monitor.ledger import HIGH, LOW, RATE, Ledger
from relict_callbacks.monitor.stop import StopPolicy

LIMIT, RISING, NOT = StopReason.RATE_ABOVE_LIMIT, StopReason.RATE_RISING, StopReason.NOT_STOPPED


def first_stop(policy: StopPolicy, rates: list[float], start: int = 0):
    """(epoch of the check that stops, reason), or (None, NOT_STOPPED): the policy is fed one rate per epoch from
    ``start`` until it says stop."""
    for epoch, rate in enumerate(rates, start):
        reason = policy.update(rate, epoch)
        if reason is not NOT:
            return epoch, reason
    return None, NOT


@pytest.mark.parametrize("options, rates, stop_at, reason", [
    (dict(max_replica_rate=0.5), [0.0, 0.1, 0.6, 0.0], 2, LIMIT),
    (dict(max_replica_rate=0.5), [0.5, 0.5, 0.5], None, NOT),  # at the limit is not above it
    (dict(max_replica_rate=0.5, patience=2), [0.6, 0.0, 0.6, 0.7, 0.0], 3, LIMIT),  # a good check resets the wait
    (dict(max_replica_rate=0.5, patience=3), [0.6, 0.7, 0.8], 2, LIMIT),
    (dict(stop_on="rising"), [0.2, 0.1, 0.1, 0.15], 3, RISING),  # equal to the lowest is not rising
    (dict(stop_on="rising", min_delta=0.1), [0.2, 0.25, 0.3, 0.35], 3, RISING),  # 0.3 is not above 0.2 + 0.1
    (dict(stop_on="rising", patience=2), [0.1, 0.3, 0.1, 0.3, 0.4], 4, RISING),
    (dict(max_replica_rate=0.5, stop_on=("limit", "rising")), [0.0, 0.6], 1, LIMIT),  # both bad: limit is named
    (dict(max_replica_rate=0.5, stop_on=("limit", "rising")), [0.0, 0.3], 1, RISING),
    (dict(max_replica_rate=0.5, stop_on="rising"), [0.9, 0.9, 0.9], None, NOT),  # the limit only counts if asked
    (dict(), [1.0, 1.0, 1.0], None, NOT),  # no limit, no criteria: never stops
])
def test_stop_policy(options, rates, stop_at, reason):
    policy = StopPolicy(**options)
    assert first_stop(policy, rates) == (stop_at, reason)
    assert policy.reason is reason
    assert (policy.message is None) is (reason is NOT)


def test_stop_messages_say_why_and_when():
    limit = StopPolicy(max_replica_rate=0.5, patience=2)
    first_stop(limit, [0.75, 1.0])
    assert limit.message == "replica rate 1.00 > 0.50 for 2 checks at epoch 1"
    rising = StopPolicy(stop_on="rising", min_delta=0.05)
    first_stop(rising, [0.25, 0.5])
    assert rising.message == "replica rate 0.50 above its lowest 0.25 (+0.05) for 1 check at epoch 1"


def test_state_round_trip_continues_where_it_left_off():
    rates = [0.6, 0.0, 0.6, 0.7, 0.8]
    whole = StopPolicy(max_replica_rate=0.5, patience=3)
    expected = first_stop(whole, rates)
    before = StopPolicy(max_replica_rate=0.5, patience=3)
    first_stop(before, rates[:3])
    after = StopPolicy(max_replica_rate=0.5, patience=3)
    after.load_state_dict(before.state_dict())
    assert first_stop(after, rates[3:], start=3) == expected == (4, LIMIT)
    assert after.message == whole.message


def test_older_state_without_some_keys_loads():
    policy = StopPolicy(max_replica_rate=0.5)
    policy.load_state_dict({"wait": {"limit": 1}})  # e.g. saved before "rising" and the stop message existed
    assert policy.wait == {"limit": 1, "rising": 0} and math.isinf(policy.lowest_rate)
    assert policy.reason is NOT and policy.message is None


@pytest.mark.parametrize("options, message", [
    (dict(patience=0), r"patience must be in \[1, inf\], got 0"),
    (dict(patience=1.5), "patience must be a whole number, got 1.5"),
    (dict(max_replica_rate=float("nan")), "max_replica_rate must be a finite number, got nan"),
    (dict(max_replica_rate=1.5), r"max_replica_rate must be in \[0, 1\], got 1.5"),
    (dict(min_delta=-0.1), "min_delta must be in"),
    (dict(stop_on="sideways"), r"stop_on must be among \('limit', 'rising'\), got \['sideways'\]"),
    (dict(stop_on="limit"), "stop_on='limit' needs max_replica_rate"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        StopPolicy(**options)


N = 59  # samples per check: 0 of 59 flagged certifies 0.1 (upper bound 0.049); 35 of 59 detects (lower bound > 0.1)


def ledger_of(flagged, metrics=None, errors=(), files=None) -> tuple[Ledger, dict[str, int]]:
    """A ledger with one check per count of flagged samples (epoch i, step 10*i, exact bounds), and the checkpoint
    files (path -> the step their content holds) ``epoch=i.ckpt`` for the epochs in ``files`` (default: all)."""
    ledger = Ledger()
    for epoch, k in enumerate(flagged):
        low, high = rate_bounds(k, N)
        extra = {} if metrics is None else {"val": metrics[epoch]}
        measured = {} if epoch in errors else {RATE: k / N, LOW: low, HIGH: high}
        ledger.record(Check(epoch, 10 * epoch, measured, num_samples=N,
                            error="sampler failed" if epoch in errors else None), extra)
    held = {f"/ckpt/epoch={epoch}.ckpt": 10 * epoch for epoch in range(len(flagged)) if files is None or epoch in files}
    return ledger, held


@pytest.mark.parametrize("flagged, choose, expected", [
    ([0, 0, 35], dict(), 1),  # the latest certified before memorization was detected (epoch 2)
    ([0, 3, 6], dict(), 0),  # 3 of 59 is under 0.1 but its upper bound (0.13) is not: not certified
    ([35, 40], dict(), None),  # none is safe
    ([0, 0, 0], dict(metric="val", mode="min"), 1),  # val: 0.5, 0.3, 0.4
    ([0, 0, 0], dict(metric="val", mode="max"), 0),
    ([0, 35, 0], dict(metric="val", mode="min"), 0),  # detected at epoch 1: epoch 2 comes after, never safe
    ([0, 0, 0], dict(files={0, 2}), 2),
    ([0, 0, 0], dict(files={0, 1}), 1),  # a file that is gone is not offered
    ([0, 0, 0], dict(errors={2}), 1),  # a failed check vouches for nothing
])
def test_safe_checkpoint_choice(flagged, choose, expected):
    choose = dict(choose)  # the parameters are shared between runs of the case
    files, errors = choose.pop("files", None), choose.pop("errors", ())
    ledger, held = ledger_of(flagged, metrics=[0.5, 0.3, 0.4], errors=errors, files=files)
    chosen = ledger.safe_checkpoint(held, 0.1, **choose)
    assert chosen == (None if expected is None else f"/ckpt/epoch={expected}.ckpt")
    assert (ledger.reason is None) == (expected is not None)


def test_non_finite_metric_is_not_best():
    ledger, held = ledger_of([0, 0], metrics=[0.5, float("nan")])
    assert ledger.safe_checkpoint(held, 0.1, metric="val", mode="min") == "/ckpt/epoch=0.ckpt"


def test_a_rewritten_file_is_judged_by_the_step_it_holds_now():
    ledger, _ = ledger_of([0, 35])
    assert ledger.safe_checkpoint({"/ckpt/last.ckpt": 0}, 0.1) == "/ckpt/last.ckpt"
    assert ledger.safe_checkpoint({"/ckpt/last.ckpt": 10}, 0.1) is None  # now epoch 1's weights, which copied
    assert "no checkpoint file holds the weights of a check before memorization was detected" in ledger.reason


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'best'"):
        ledger, held = ledger_of([0])
        ledger.safe_checkpoint(held, 0.1, metric="val", mode="best")
