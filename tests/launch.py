"""Start a script on several CPU processes the way ``torchrun`` does, and what every 2-process run of the monitor
(ddp_fit.py for Lightning, monai_ddp_run.py for MONAI) must show."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path


def torchrun(script: Path, argument, processes: int = 2) -> list[str]:
    """Run ``processes`` copies of ``script`` with the environment ``torchrun`` gives each; their outputs."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(script), str(argument)], cwd=script.parent, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "WORLD_SIZE": str(processes), "RANK": str(rank),
                                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(processes)})
             for rank in range(processes)]
    try:
        outputs = [process.communicate(timeout=300)[0] for process in ranks]
    finally:
        for process in ranks:
            process.kill()  # a rank left waiting for a failed one
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, f"rank {rank}:\n{output[-3000:]}"
    return outputs


def ranks_agree(out: Path, rank1_output: str) -> tuple[dict, dict]:
    """Assert the story both 2-process runs tell; each rank's ``rank<R>.json``. The runs check epochs 0-2 with
    ``num_samples=5``, rank 1's sampler fails at epoch 1 and the samples are copies from epoch 2 on; each rank
    has its own ``save_dir``, ``out/relict-rank<R>``."""
    rank0, rank1 = (json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["bank_size"] == 8 and rank1["bank_size"] is None  # the whole dataset, built on rank 0 only
    assert rank0["history"] == rank1["history"]
    assert [(e["epoch"], e["samples"], e.get("relict/replica_rate"), e["error"]) for e in rank0["history"]] == [
        (0, 5, 0.0, None),  # 3 + 2 drawn, gathered, 5 scored
        (1, 0, None, "the sampler failed on process(es) [1], whose log has the error"),  # on both ranks; went on
        (2, 5, 1.0, None)]
    assert re.search(r"relict: sampling failed on process 1: .*RuntimeError: CUDA out of memory \(pretend\)",
                     rank1_output)  # the cause, in the log of the process where it happened
    assert rank0["reason"] == rank1["reason"] == "RATE_ABOVE_LIMIT"
    written = sorted(path.name for path in (out / "relict-rank0").iterdir())
    assert written == ["gallery-epoch=0.png", "gallery-epoch=2.png", "history.json", "report-epoch=0.json",
                       "report-epoch=2.json"]
    assert not (out / "relict-rank1").exists()
    assert json.loads((out / "relict-rank0" / "history.json").read_text()) == rank0["history"]
    return rank0, rank1
