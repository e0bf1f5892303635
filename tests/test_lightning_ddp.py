"""ReplicaMonitor under strategy="ddp" with two CPU processes (gloo): gathered once, same decision everywhere, files
from rank 0 only."""

import subprocess
import sys
from pathlib import Path

from launch import ranks_agree


def test_ddp_two_processes_agree_and_stop(tmp_path):
    script = Path(__file__).with_name("ddp_fit.py")
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=script.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = ranks_agree(tmp_path, result.stderr)
    assert rank0["epoch"] == rank1["epoch"] == 3
