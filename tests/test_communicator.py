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


def test_two_processes_gather_unequal_shares_and_agree_on_failures(tmp_path):
    torchrun(Path(__file__).with_name("communicator_run.py"), tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    shared = {"kind": "DistributedCommunicator", "world_size": 2, "gather": [[0, 0]] * 3 + [[1, 1]] * 2,
              "ranks_where": [1], "broadcast": {"from": 0}, "from_rank_zero": "'built on 0'",
              "mismatch": "ValueError: cannot gather tensors whose shapes differ beyond dim 0: [[1, 2], [1, 3]] by "
                          "rank",
              "too_few_samples": "ValueError: num_samples=1 is fewer than the 2 processes, each of which draws at "
                                 "least one sample: set num_samples >= 2"}
    assert rank0 == {**shared, "rank": 0, "rank_zero_fails": "ZeroDivisionError: division by zero"}
    assert rank1 == {**shared, "rank": 1, "rank_zero_fails": "RuntimeError: rank 0 failed: ZeroDivisionError: "
                                                             "division by zero"}
