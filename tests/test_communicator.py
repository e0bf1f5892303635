"""The communicator of distributed checks: one process, and two real gloo processes (unequal shares, failures)."""

import json
from pathlib import Path

import pytest
import torch
from launch import torchrun

from relict_callbacks.monitor.communicator import SINGLE_PROCESS, current_communicator


def test_single_process_returns_its_input_and_raises_the_original_error():
    images = torch.rand(3, 1, 4, 4)
    assert current_communicator() is SINGLE_PROCESS  # torch.distributed is not initialized here
    assert SINGLE_PROCESS.gather(images) is images and SINGLE_PROCESS.ranks_where(False) == []
    with pytest.raises(ZeroDivisionError):
        SINGLE_PROCESS.from_rank_zero(lambda: 1 / 0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two gloo processes running communicator_run.py saw, and their outputs (one run for the module)."""
    out = tmp_path_factory.mktemp("ranks")
    outputs = torchrun(Path(__file__).with_name("communicator_run.py"), out)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)], outputs


def test_two_processes_gather_unequal_shares_and_agree_on_failures(ranks):
    (rank0, rank1), _ = ranks
    shared = {"kind": "DistributedCommunicator", "world_size": 2, "gather": [[0, 0]] * 3 + [[1, 1]] * 2,
              "gather_row_by_row": [[0, 0]] * 3 + [[1, 1]] * 2,
              "ranks_where": [1], "broadcast": {"from": 0}, "from_rank_zero": "'built on 0'",
              "mismatch": "ValueError: cannot gather tensors whose shapes differ beyond dim 0: [[1, 2], [1, 3]] by "
                          "rank",
              "too_few_samples": "ValueError: num_samples=1 is fewer than the 2 processes, each of which draws at "
                                 "least one sample: set num_samples >= 2",
              "partitioned": "ValueError: the 2 processes load different training sets (each its own part of it?): "
                             "a bank built from rank 0's would miss the other processes' patients, and their copies "
                             "would go unflagged; pass train_items=<the whole training set> (the same on every "
                             "process)"}
    assert {key: rank0[key] for key in shared} == {key: rank1[key] for key in shared} == shared
    assert (rank0["rank"], rank0["rank_zero_fails"]) == (0, "ZeroDivisionError: division by zero")
    assert (rank0["seeds"], rank1["seeds"]) == ([0, 2], [1, 3])  # one sample a call: no two share a seed
    assert (rank1["rank"], rank1["rank_zero_fails"]) == (1, "RuntimeError: rank 0 failed: ZeroDivisionError: "
                                                             "division by zero")


def test_monitor_check_through_two_processes(ranks):
    """Monitor.check on two real gloo processes, no training framework: 2 + 1 samples scored once on rank 0, the
    outcome, the decision and the stop state the same on both; a failure on rank 1 recorded alike, or raised on
    both with ``strict``."""
    (rank0, rank1), outputs = ranks
    for key in ("history", "stop", "stop_state"):
        assert rank0["check"][key] == rank1["check"][key]
    entry = rank0["check"]["history"][0]
    assert (entry["epoch"], entry["step"], entry["samples"], entry["relict/replica_rate"]) == (0, 7, 3, 1.0)
    assert rank0["check"]["stop"] == "RATE_ABOVE_LIMIT" and rank0["check"]["stop_state"]["wait"]["limit"] == 1
    assert (rank0["check"]["has_bank"], rank0["check"]["has_report"]) == (True, True)  # rank 0 alone scores
    assert (rank1["check"]["has_bank"], rank1["check"]["has_report"]) == (False, False)

    assert rank0["failed_check"] == rank1["failed_check"]
    assert [(e["samples"], e["error"]) for e in rank0["failed_check"]] == [
        (0, "the sampler failed on process(es) [1], whose log has the error")]
    assert "relict: sampling failed on process 1: sampler failing.<locals>.flaky raised RuntimeError" in outputs[1]
    assert rank0["strict"] == "RuntimeError: the sampler failed on process(es) [1], whose log has the error"
    assert rank1["strict"] == ("SamplerError: sampler failing.<locals>.flaky raised RuntimeError: CUDA out of "
                               "memory (pretend)")


def test_a_rank_waits_for_a_bank_build_longer_than_its_collectives_may_wait(tmp_path):
    """Rank 0 reads the training items for 5 s while rank 1 waits in collectives that time out after 2 s (NCCL's
    watchdog: 10 minutes): rank 0's heartbeats keep rank 1 waiting, and both learn the bank's image shape."""
    torchrun(Path(__file__).with_name("patience_run.py"), tmp_path)
    seen = [json.loads((tmp_path / f"patience{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["image_shape"] for rank in seen] == [[1, 2], [1, 2]]
    assert min(rank["seconds"] for rank in seen) > 4  # twice the timeout
