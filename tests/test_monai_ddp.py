"""ReplicaMonitorHandler on a MONAI SupervisedTrainer with two CPU processes (gloo, ignite idist): samples drawn in
shares and scored once on rank 0, files from rank 0 only, the same history and stop on both ranks."""

import json
from pathlib import Path

import torch
from launch import torchrun


def test_ddp_two_processes_agree_stop_together_and_only_rank_zero_writes(tmp_path):
    outputs = torchrun(Path(__file__).with_name("monai_ddp_run.py"), tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    assert rank0["bank_size"] == 8 and rank1["bank_size"] is None  # the whole dataset, built on rank 0 only
    assert rank0["history"] == rank1["history"]
    assert [(e["epoch"], e["samples"], e.get("relict/replica_rate"), e["error"]) for e in rank0["history"]] == [
        (0, 5, 0.0, None),  # 3 + 2 drawn, gathered, 5 scored
        (1, 0, None, "the sampler failed on process(es) [1], whose log has the error"),  # on both ranks; went on
        (2, 5, 1.0, None)]
    assert ("relict: sampling failed on process 1: sampler train.<locals>.sampler raised RuntimeError: CUDA out of "
            "memory (pretend)") in outputs[1]
    assert rank0["reason"] == rank1["reason"] == "RATE_ABOVE_LIMIT"
    assert rank0["epoch"] == rank1["epoch"] == 3 and rank0["stopped_epoch"] == rank1["stopped_epoch"] == 2
    assert rank0["metrics"] == rank1["metrics"] and rank0["metrics"]["relict/replica_rate"] == 1.0

    written = sorted(path.name for path in (tmp_path / "relict-rank0").iterdir())
    assert written == ["gallery-epoch=0.png", "gallery-epoch=2.png", "history.json", "report-epoch=0.json",
                       "report-epoch=2.json"]
    assert not (tmp_path / "relict-rank1").exists()
    assert json.loads((tmp_path / "relict-rank0" / "history.json").read_text()) == rank0["history"]

    checkpoints = list((tmp_path / "ckpt").iterdir())  # CheckpointSaver writes on rank 0; both ranks know the file
    assert len(checkpoints) == 1 and rank0["safe"] == rank1["safe"] == str(checkpoints[0])
    assert [e["checkpoint"] is not None for e in rank0["history"]] == [True, False, False]
    saved = torch.load(checkpoints[0], weights_only=True)
    assert [e["epoch"] for e in saved["relict"]["history"]] == [0]
