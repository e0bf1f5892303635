"""Wall time and peak memory of ReplicaScorer.score, as ratios against baselines measured in the same run.

64 samples against a bank of 2,000 3D items at 64³ (and a 2D case at 128²), voxel level:
  (a) a naive per-pair NumPy NCC loop (np.corrcoef), timed on a subset and extrapolated;
  (b) a bare torch matmul of the same shapes (queries @ bank.T, float32, bank in memory).
The scorer reads its float16 bank memory-mapped from disk (a saved bank, as users load it), with the default
VoxelLevel (flip + shift search) and with plain NCC (``max_shift=0, flips=()``) to show what the search costs.
Times are the best of 3 runs. Peak memory is the process's peak resident set (VmHWM, reset before each measurement) above what it held
before; memory-mapped bank pages count while resident. Run: ``python benchmarks/scoring.py [--items 2000]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import relict_callbacks as rc
from relict_callbacks.data import LR_AXIS


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure(fn, repeats: int = 3):
    """(best seconds of ``repeats`` runs, peak MiB above the starting resident set, result) of ``fn()``."""
    runs = [_measure_once(fn) for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]


def _measure_once(fn):
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, (_rss_kib("VmHWM") - before) / 1024, result


def smooth_batch(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Distinct smooth random images [n, 1, *shape], standing in for patients (speed does not depend on content)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *(s // 4 for s in shape), generator=gen)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return torch.nn.functional.interpolate(x, size=shape, mode=mode, align_corners=False)


def run_case(name: str, shape: tuple[int, ...], n_items: int, n_samples: int, workdir: Path) -> None:
    print(f"\n== {name}: {n_samples} samples x bank of {n_items} items at {'x'.join(map(str, shape))} ==")
    holdout = smooth_batch(16, shape, seed=10**6)
    samples = smooth_batch(n_samples, shape, seed=2 * 10**6)
    samples[:8] = smooth_batch(8, shape, seed=0).flip(2 + LR_AXIS[len(shape)])  # mirrored copies of bank items
    paths = {}
    for label, level in (("default (flip + shift search)", rc.VoxelLevel()),
                         ("plain NCC", rc.VoxelLevel(max_shift=0, flips=()))):
        t = time.perf_counter()
        items = (image for chunk in range(0, n_items, 100)
                 for image in smooth_batch(min(100, n_items - chunk), shape, seed=chunk))
        bank = rc.ReferenceBank.build(items, [level], holdout=holdout, progress=False, batch_size=32)
        paths[label] = bank.save(workdir / f"{name}-{len(paths)}.npz")
        print(f"bank build ({label}): {time.perf_counter() - t:.1f} s, file {paths[label].stat().st_size / 2**20:.0f} MiB")
        del bank

    refs = smooth_batch(n_items, shape, seed=7).flatten(1)
    queries = samples.flatten(1)
    bare, _, _ = measure(lambda: (queries @ refs.T).topk(5, dim=1))
    refs = None  # free the float32 copy before the scorer runs

    sub_q, sub_r = samples[:2].flatten(1).numpy(), smooth_batch(40, shape, seed=9).flatten(1).numpy()
    naive_seconds, _, _ = measure(lambda: [[np.corrcoef(q, r)[0, 1] for r in sub_r] for q in sub_q], repeats=1)
    naive = naive_seconds / (len(sub_q) * len(sub_r)) * n_samples * n_items

    dims = int(np.prod(shape))
    print(f"bare torch matmul + top-k (same shapes, fp32 in memory): {bare:.2f} s, bank held as float32 in RAM: "
          f"{n_items * dims * 4 / 2**20:.0f} MiB")
    print(f"naive NumPy corrcoef loop (extrapolated from {len(sub_q) * len(sub_r)} pairs): {naive:.1f} s")
    for label, path in paths.items():
        bank = rc.ReferenceBank.load(path)
        scorer = rc.ReplicaScorer(bank, thresholds={"voxel": 0.9})
        scorer.score(samples[:2])  # warm the page cache and the kernels
        seconds, peak, report = measure(lambda: scorer.score(samples))
        caught = sum(r.is_replica for r in report.records[:8])
        print(f"ReplicaScorer.score, {label}: {seconds:.2f} s, peak working memory +{max(peak, 0):.0f} MiB "
              f"(bank float16, memory-mapped: {n_items * dims * 2 / 2**20:.0f} MiB) | "
              f"{seconds / bare:.2f}x the bare matmul, {naive / seconds:.0f}x faster than the naive loop | "
              f"mirrored copies flagged {caught}/8")
        bank = scorer = None  # release the memory map before the next bank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as workdir:
        run_case("3D", (64, 64, 64), args.items, args.samples, Path(workdir))
        run_case("2D", (128, 128), args.items, args.samples, Path(workdir))


if __name__ == "__main__":
    main()
