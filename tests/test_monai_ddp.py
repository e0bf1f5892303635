"""ReplicaMonitorHandler on a MONAI SupervisedTrainer with two CPU processes (gloo, ignite idist): samples drawn in
shares and scored once on rank 0, files from rank 0 only, the same history and stop on both ranks."""

from pathlib import Path

import torch
from launch import ranks_agree, torchrun


def test_ddp_two_processes_agree_stop_together_and_only_rank_zero_writes(tmp_path):
    outputs = torchrun(Path(__file__).with_name("monai_ddp_run.py"), tmp_path)
    rank0, rank1 = ranks_agree(tmp_path, outputs[1])
    assert rank0["epoch"] == rank1["epoch"] == 3 and rank0["stopped_epoch"] == rank1["stopped_epoch"] == 2
    assert rank0["metrics"] == rank1["metrics"] and rank0["metrics"]["relict/replica_rate"] == 1.0

    checkpoints = list((tmp_path / "ckpt").iterdir())  # CheckpointSaver writes on rank 0; both ranks know the file
    assert len(checkpoints) == 1 and rank0["safe"] == rank1["safe"] == str(checkpoints[0])
    assert [e["checkpoint"] is not None for e in rank0["history"]] == [True, False, False]
    saved = torch.load(checkpoints[0], weights_only=True)
    assert [e["epoch"] for e in saved["relict"]["history"]] == [0]
