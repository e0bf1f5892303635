"""ReplicaMonitor under strategy="ddp" with two CPU processes (gloo): gathered once, same decision everywhere, files
from rank 0 only."""

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
    assert [(e["epoch"], e["samples"], e.get("relict/replica_rate"), e["error"]) for e in rank0["history"]] == [
        (0, 5, 0.0, None),  # 3 + 2 drawn, gathered, 5 scored
        (1, 0, None, "the sampler failed on process(es) [1], whose log has the error"),  # on both ranks; went on
        (2, 5, 1.0, None)]
    assert ("relict: sampling failed on process 1: sampler sampler raised RuntimeError: CUDA out of memory "
            "(pretend)") in result.stderr
    assert rank0["reason"] == rank1["reason"] == "RATE_ABOVE_LIMIT"
    assert rank0["epoch"] == rank1["epoch"] == 3

    written = sorted(path.name for path in (tmp_path / "relict-rank0").iterdir())
    assert written == ["gallery-epoch=0.png", "gallery-epoch=2.png", "history.json", "report-epoch=0.json",
                       "report-epoch=2.json"]
    assert not (tmp_path / "relict-rank1").exists()
    assert json.loads((tmp_path / "relict-rank0" / "history.json").read_text()) == rank0["history"]
