"""Start a script on several CPU processes the way ``torchrun`` does, for the distributed tests."""

import os
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
