"""What verifying a bank's checksums costs, as ratios against baselines measured in the same run.

A saved voxel-level bank of 2,000 3D items at 64³ (float16 rows: 1.05 GB, plus thumbnails and the null) is
  (a) read plainly: the whole file, sequentially, in 16 MiB blocks into one buffer (what any use of the bank
      costs at least once: exact search reads every row);
  (b) loaded with ``ReferenceBank.load``, which maps every array and hashes it (xxh3-128, 16 MiB blocks);
and, when saving, (c) ``np.savez`` of the same arrays against (d) ``ReferenceBank.save`` (checksums + write).
The file is in the page cache for all of them (it was just written), so (a) is a memory-speed read, the worst
case for the ratio; from a cold disk the read costs more and the hash the same. Times are the best of 3 runs.
Run: ``python benchmarks/bank_integrity.py [--items 2000]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import relict_callbacks as rc
from relict_callbacks.bank import FORMAT

BLOCK = 1 << 24


def best(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` runs of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def plain_read(path: Path) -> None:
    buffer = bytearray(BLOCK)
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buffer):
            pass


def make_bank(items: int, grid: int) -> rc.ReferenceBank:
    """A voxel-level bank of ``items`` random float16 rows on a ``grid``³ grid (content does not change speed)."""
    level = rc.VoxelLevel(grid=grid)
    rng = np.random.default_rng(0)
    rows = np.empty((items, 1, grid, grid, grid), np.float16)
    for start in range(0, items, 100):
        rows[start : start + 100] = rng.standard_normal((min(100, items - start), 1, grid, grid, grid), np.float32)
    thumbs = rows[:, :, ::4, ::4, ::4].copy()
    ids = [f"patient-{i:05d}" for i in range(items)]
    manifest = {"format": FORMAT, "levels": [level.config()], "ids_digest": "benchmark", "content": "benchmark",
                "holdout": None, "null_size": 512, "channels": 1, "spatial_dims": 3, "null_source": "leave-one-out"}
    nulls = {"voxel": rng.uniform(0.5, 0.9, min(items, 512)).astype(np.float32)}
    return rc.ReferenceBank([level], ids, {"voxel": {"rows": rows, "thumbs": thumbs}}, nulls, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--grid", type=int, default=64)
    args = parser.parse_args()
    bank = make_bank(args.items, args.grid)
    with tempfile.TemporaryDirectory() as tmp:
        path, raw = Path(tmp) / "bank.npz", Path(tmp) / "raw.npz"
        members = {"rows": bank.arrays["voxel"]["rows"], "thumbs": bank.arrays["voxel"]["thumbs"]}
        savez = best(lambda: np.savez(raw, **members))
        raw.unlink()
        save = best(lambda: bank.save(path))
        size = path.stat().st_size / 1e9
        read = best(lambda: plain_read(path))
        load = best(lambda: rc.ReferenceBank.load(path))
    print(f"bank: {args.items} x {args.grid}^3 float16 rows, file {size:.2f} GB (page-cached)")
    print(f"  plain sequential read      {read:6.2f} s  ({size / read:5.1f} GB/s)  = 1.00")
    print(f"  ReferenceBank.load (verify) {load:6.2f} s  ({size / load:5.1f} GB/s)  = {load / read:.2f} x the read")
    print(f"  np.savez of the arrays      {savez:6.2f} s  = 1.00")
    print(f"  ReferenceBank.save (+hash)  {save:6.2f} s  = {save / savez:.2f} x np.savez")


if __name__ == "__main__":
    main()
