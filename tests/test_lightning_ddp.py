"""ReplicaMonitor under strategy="ddp" with two CPU processes (gloo): gathered once, same decision everywhere."""

import json
import subprocess
import sys
from pathlib import Path


def test_ddp_two_processes_agree_and_stop(tmp_path):
    script = Path(__file__).with_name("ddp_fit.py")
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=script.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["bank_size"] == 8 and rank1["bank_size"] is None  # the whole dataset, built on rank 0 only
    assert rank0["history"] == rank1["history"]
    assert [(e["epoch"], e["samples"], e["relict/replica_rate"]) for e in rank0["history"]] == [
        (0, 5, 0.0), (1, 5, 0.0), (2, 5, 1.0)]  # 3 drawn per rank, gathered, 5 scored
    assert rank0["reason"] == rank1["reason"] == "RATE_ABOVE_LIMIT"
    assert rank0["epoch"] == rank1["epoch"] == 3
