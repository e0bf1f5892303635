"""The stop policy and the checkpoint choice on their own, table-driven (like Lightning's test_early_stopping.py)."""

import math

import pytest

from relict_callbacks.monitor import Check, StopReason
from relict_callbacks.monitor.ledger import Ledger
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


def ledger_of(tmp_path, rates, metrics=None, errors=(), files=None) -> Ledger:
    """A ledger with one check per rate (epoch i, step 10*i) and a checkpoint file ``epoch=i.ckpt`` for each."""
    ledger = Ledger()
    for epoch, rate in enumerate(rates):
        extra = {} if metrics is None else {"val": metrics[epoch]}
        error = "sampler failed" if epoch in errors else None
        ledger.record(Check(epoch, 10 * epoch, {} if error else {"relict/replica_rate": rate}, error=error), extra)
        path = tmp_path / f"epoch={epoch}.ckpt"
        if files is None or epoch in files:
            path.write_bytes(b"weights")
        ledger.note_checkpoint(epoch, 10 * epoch, str(path))
    return ledger


@pytest.mark.parametrize("rates, choose, expected", [
    ([0.0, 0.0, 0.6], dict(), 1),  # the latest whose rate stayed under the limit
    ([0.0, 0.1, 0.2], dict(), 1),  # at the limit is safe
    ([0.6, 0.7], dict(), None),  # none is safe
    ([0.0, 0.0, 0.0], dict(metric="val", mode="min"), 1),  # val: 0.5, 0.3, 0.4
    ([0.0, 0.0, 0.0], dict(metric="val", mode="max"), 0),
    ([0.0, 0.6, 0.0], dict(metric="val", mode="min"), 2),  # the best (epoch 1) copied
    ([0.0, 0.0, 0.0], dict(files={0, 2}), 2),
    ([0.0, 0.0, 0.0], dict(files={0, 1}), 1),  # a deleted file is not offered
    ([0.0, 0.0, 0.0], dict(errors={2}), 1),  # a failed check vouches for nothing
])
def test_safe_checkpoint_choice(tmp_path, rates, choose, expected):
    files, errors = choose.pop("files", None), choose.pop("errors", ())
    ledger = ledger_of(tmp_path, rates, metrics=[0.5, 0.3, 0.4], errors=errors, files=files)
    chosen = ledger.safe_checkpoint(0.1, **choose)
    assert chosen == (None if expected is None else str(tmp_path / f"epoch={expected}.ckpt"))


def test_non_finite_metric_is_not_best(tmp_path):
    ledger = ledger_of(tmp_path, [0.0, 0.0], metrics=[0.5, float("nan")])
    assert ledger.safe_checkpoint(0.1, metric="val", mode="min") == str(tmp_path / "epoch=0.ckpt")


def test_rewritten_file_belongs_to_the_latest_check(tmp_path):
    ledger = ledger_of(tmp_path, [0.0, 0.6], files=set())
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"weights")
    ledger.note_checkpoint(0, 0, str(last))
    assert ledger.safe_checkpoint(0.1) == str(last)
    ledger.note_checkpoint(1, 10, str(last))  # last.ckpt now holds epoch 1's weights, which copied
    assert ledger.safe_checkpoint(0.1) is None
    assert [e["checkpoint"] for e in ledger.entries] == [None, str(last)]


def test_bad_mode_is_named(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'best'"):
        ledger_of(tmp_path, [0.0]).safe_checkpoint(0.1, metric="val", mode="best")
