"""Wall and CPU time of `relict audit` on folders of 3D NIfTI phantoms, against just reading the same files.

Writes N training and N synthetic head CT phantoms (64³, 1 mm; a tenth of the synthetic set are copies of
training patients) to NIfTI in a temporary folder, then times, each in a fresh process:
  baseline: reading every file with the audit's reader (MONAI LoadImage, RAS, resampling to the grid);
  audit:    `relict audit --train ... --synthetic ... --out ...` (bank, leave-one-out null, scoring, report);
  --bank:   `relict audit --bank ...` with a bank from `relict bank build` (untimed): scoring and report only.
Each is given in wall seconds and in CPU seconds of the process (steadier on a shared machine).

    .venv/bin/python benchmarks/audit.py            # 100 + 100 phantoms
    .venv/bin/python benchmarks/audit.py --n 20     # quicker
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import relict_callbacks as rc

READ_ALL = """
import sys
from relict_callbacks.io import ImageFolder
for folder in sys.argv[1:]:
    for item in ImageFolder(folder):
        pass
"""


def write_set(root: Path, n: int, size: int) -> None:
    train = rc.data.make_phantoms(n, ndim=3, size=size, seed=0, id_prefix="case")
    copies = [rc.data.make_replica(train[7 * i % n], kind, seed=i)
              for i, kind in enumerate(rc.data.PERTURBATIONS * n) if i < n // 10]
    synthetic = rc.data.make_phantoms(n - len(copies), ndim=3, size=size, seed=2, id_prefix="gen") + copies
    for name, items in (("train", train), ("synthetic", synthetic)):
        (root / name).mkdir(parents=True)
        for i, item in enumerate(items):
            nib.save(nib.Nifti1Image(item["image"][0], np.eye(4)), root / name / f"{name}{i:04d}.nii.gz")


def timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of running ``command``."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="training images, and as many synthetic ones")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    relict = [sys.executable, "-m", "relict_callbacks.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_set(root, args.n, args.size)
        train, synthetic = ["--train", str(root / "train")], ["--synthetic", str(root / "synthetic"), "--no-progress"]
        read = timed([sys.executable, "-c", READ_ALL, str(root / "train"), str(root / "synthetic")])
        audit = timed(relict + ["audit", *train, *synthetic, "--out", str(root / "out")])
        subprocess.run(relict + ["bank", "build", *train, "--no-progress", "--out", str(root / "bank.npz")],
                       check=True, stdout=subprocess.DEVNULL)
        scoring = timed(relict + ["audit", "--bank", str(root / "bank.npz"), *synthetic, "--out", str(root / "out")])
    print(f"{2 * args.n} 3D phantoms ({args.size}³ NIfTI), wall s (CPU s): reading them {read[0]:.1f} ({read[1]:.1f}), "
          f"relict audit {audit[0]:.1f} ({audit[1]:.1f}), relict audit --bank {scoring[0]:.1f} ({scoring[1]:.1f}); "
          f"against reading, CPU: audit {audit[1] / read[1]:.2f}x, audit --bank {scoring[1] / read[1]:.2f}x")


if __name__ == "__main__":
    main()
