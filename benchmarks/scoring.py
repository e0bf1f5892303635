"""Wall time and peak memory of ReplicaScorer.score, as ratios against baselines measured in the same run.

64 samples against banks of 2,000 3D items at 64³ and 20,000 2D items at 128² (and 100,000 at 128² on a GPU),
voxel level, on ``--device cpu`` or ``cuda``:
  (a) a naive per-pair NumPy NCC loop (np.corrcoef), timed on a subset and extrapolated (CPU only);
  (b) a bare torch matmul of the same shapes on the device (queries @ bank.T + top-k, float32, bank in memory).
The bank is built once on the device (build throughput in items/s is printed) and saved; the scorer reads it
memory-mapped from disk (as users load it), with the default VoxelLevel (mirror + shift + bend search), without
the bend search (``max_bend=0``), also with left-right mirrors only, and with plain NCC (``max_shift=0, flips=(),
max_bend=0``; all the same rows) to show what each search costs; the breakdown splits a score into embedding the
samples and searching the bank, and the search into the phases the voxel level names (the plain search, the
thumbnail search, the refinement, the bend search) in one profiled run. The rows are placed within the default
``device_budget`` (on the CPU: ranked in RAM by their low frequencies, in bfloat16 where the CPU multiplies
it in hardware, else in float32, and re-scored exactly from the stored rows; placed once by the warm-up score);
plain NCC is also run with ``device_budget=0`` (rows memory-mapped as float16, converted chunk by chunk at every
search). Times are the best of 3 runs; each run of a score is paired with a run of
the bare matmul just before it, and its ratio is the median of the 3 paired ratios (their range in brackets), so
that a slower spell of a shared machine slows both sides of a ratio. Peak memory is the process's peak
resident set (VmHWM, reset before each measurement) above what it held before, the placed rows excluded (they are
held from the warm-up on); memory-mapped bank pages count while resident. Page faults are the score's minor ones
(median of the 3 runs): each new page the process touches (memory the allocator took afresh from the OS, or bank
pages mapped for the first time) costs one, about 2 µs on the machine of the README's figures.
Run: ``python benchmarks/scoring.py [--device cuda] [--items-3d 2000 --items-2d 20000]``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import relict_callbacks as rc
from relict_callbacks.data import LR_AXIS
from relict_callbacks.items import iter_batches
from relict_callbacks.search import fast_bf16, placed_bytes


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fn, repeats: int = 3):
    """(best seconds of ``repeats`` runs, peak MiB above the starting resident set, result) of ``fn()``."""
    runs = [_measure_once(fn) for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]


def _measure_once(fn):
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    _sync()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    result = fn()
    _sync()
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds, (_rss_kib("VmHWM") - before) / 1024, result, faults


def smooth_batch(n: int, shape: tuple[int, ...], seed: int, device="cpu") -> torch.Tensor:
    """Distinct smooth random images [n, 1, *shape], standing in for patients (speed does not depend on content)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *(s // 4 for s in shape), generator=gen).to(device)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return torch.nn.functional.interpolate(x, size=shape, mode=mode, align_corners=False)


def run_case(name: str, shape: tuple[int, ...], n_items: int, n_samples: int, workdir: Path, device: str) -> None:
    print(f"\n== {name}: {n_samples} samples x bank of {n_items} items at {'x'.join(map(str, shape))}, {device} ==")
    holdout = smooth_batch(16, shape, seed=10**6)
    samples = smooth_batch(n_samples, shape, seed=2 * 10**6)
    samples[:8] = smooth_batch(8, shape, seed=0).flip(2 + LR_AXIS[len(shape)])  # mirrored copies of bank items
    items = (image for chunk in range(0, n_items, 100)
             for image in smooth_batch(min(100, n_items - chunk), shape, seed=chunk))
    _sync()
    t = time.perf_counter()
    bank = rc.ReferenceBank.build(items, [rc.VoxelLevel()], holdout=holdout, progress=False, batch_size=32,
                                  device=device)
    _sync()
    seconds = time.perf_counter() - t
    default = bank.save(workdir / f"{name}-default.npz")
    print(f"bank build on {device}: {seconds:.1f} s, {n_items / seconds:.0f} items/s (making the items included), "
          f"file {default.stat().st_size / 2**20:.0f} MiB")
    variants = {"no bend search (max_bend=0)": rc.VoxelLevel(max_bend=0),
                "no bend search, left-right mirrors only": rc.VoxelLevel(max_bend=0, flips="lr"),
                "plain NCC": rc.VoxelLevel(max_shift=0, flips=(), max_bend=0)}
    paths = {}
    for label, level in variants.items():  # the same rows; only the search differs
        bank.levels, bank.manifest["levels"] = [level], [level.config()]
        paths[label] = bank.save(workdir / f"{name}-{len(paths)}.npz")
    runs = {"default (mirrors on every axis + shift + bend search)": (default, None),
            **{label: (path, None) for label, path in paths.items()},
            "plain NCC, rows memory-mapped (device_budget=0)": (paths["plain NCC"], 0)}
    del bank

    refs = smooth_batch(n_items, shape, seed=7, device=device).flatten(1)
    queries = samples.to(device).flatten(1)

    def bare_matmul():
        return (queries @ refs.T).topk(5, dim=1)

    bare, _, _ = measure(bare_matmul)
    reduced = ""  # the same in the reduced precision the search multiplies in, where it does
    if device != "cpu" or fast_bf16():
        dtype = torch.float16 if device != "cpu" else torch.bfloat16
        low_refs, low_queries = refs.to(dtype), queries.to(dtype)
        seconds, _, _ = measure(lambda: (low_queries @ low_refs.T).topk(5, dim=1))
        reduced = f" ({str(dtype).removeprefix('torch.')}: {seconds * 1000:.1f} ms)"
        low_refs = low_queries = None

    dims = int(np.prod(shape))
    print(f"bare torch matmul + top-k (same shapes, fp32 on {device}): {bare * 1000:.1f} ms{reduced}"
          + f", bank held as float32: {n_items * dims * 4 / 2**20:.0f} MiB")
    naive = None
    if device == "cpu":
        sub_q, sub_r = samples[:2].flatten(1).numpy(), smooth_batch(40, shape, seed=9).flatten(1).numpy()
        naive_seconds, _, _ = measure(lambda: [[np.corrcoef(q, r)[0, 1] for r in sub_r] for q in sub_q], repeats=1)
        naive = naive_seconds / (len(sub_q) * len(sub_r)) * n_samples * n_items
        print(f"naive NumPy corrcoef loop (extrapolated from {len(sub_q) * len(sub_r)} pairs): {naive:.1f} s")
    for label, (path, budget) in runs.items():
        bank = rc.ReferenceBank.load(path)
        scorer = rc.ReplicaScorer(bank, thresholds={"voxel": 0.9}, device=device, device_budget=budget)
        scorer.score(samples[:2])  # warm the page cache and the kernels, place the rows
        paired = [(_measure_once(bare_matmul)[0], *_measure_once(lambda: scorer.score(samples))) for _ in range(3)]
        seconds, peak, report = min(p[1] for p in paired), max(p[2] for p in paired), paired[-1][3]
        ratios = sorted(p[1] / p[0] for p in paired)
        faults = int(np.median([p[4] for p in paired]))
        level = bank.levels[0]
        embed, _, query = measure(lambda: _embed(level, samples, device))
        search, _, _ = measure(lambda: bank.nearest(level, query, device, budget=budget))
        phases = _phases(lambda: bank.nearest(level, query, device, budget=budget))
        caught = sum(r.is_replica for r in report.records[:8])
        placed, _ = placed_bytes(bank.rows(level, device, budget), device)
        faster = "" if naive is None else f", {naive / seconds:.0f}x faster than the naive loop"
        print(f"ReplicaScorer.score, {label}: {seconds * 1000:.0f} ms (embed the samples {embed * 1000:.0f} ms + "
              f"search the bank {search * 1000:.0f} ms), peak working memory +{max(peak, 0):.0f} MiB, "
              f"{faults} page faults ({faults * resource.getpagesize() / 2**20:.0f} MiB of new pages), "
              f"rows placed: {placed / 2**20:.0f} MiB | {ratios[1]:.2f}x the bare matmul "
              f"({ratios[0]:.2f}-{ratios[2]:.2f}x){faster} | mirrored copies flagged {caught}/8\n"
              f"  search phases (one profiled run): {phases}")
        bank = scorer = None  # release the memory map before the next bank


def _phases(fn) -> str:
    """Milliseconds of each phase the voxel search names (``relict.voxel.*`` in torch.profiler) in one run of
    ``fn()``, as the CPU sees them (on CUDA, a phase ends once the CPU has waited for its results)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        fn()
        _sync()
    times = {e.key.removeprefix("relict.voxel."): e.cpu_time_total / 1000 for e in profiler.key_averages()
             if e.key.startswith("relict.voxel.")}
    return ", ".join(f"{name} {times[name]:.0f} ms" for name in ("search", "thumbnails", "refine", "bend")
                     if name in times)


def _embed(level, samples: torch.Tensor, device) -> dict[str, np.ndarray]:
    """The level's query rows for ``samples``, embedded in batches of 16 as the scorer does."""
    parts = [level.embed(batch, device) for batch in iter_batches(samples, 16, name="sample")]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--items-3d", type=int, default=2000, help="3D bank items at 64³ (0: skip)")
    parser.add_argument("--items-2d", type=int, default=20000, help="2D bank items at 128² (0: skip)")
    parser.add_argument("--items-2d-large", type=int, default=None,
                        help="a second, larger 2D bank (default 100,000 on cuda, none on cpu)")
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    large = args.items_2d_large if args.items_2d_large is not None else (100_000 if args.device == "cuda" else 0)
    where = (torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads, "
             + ("bfloat16 ranking (the CPU multiplies bfloat16 in hardware)" if fast_bf16() else "float32 ranking"))
    print(f"torch {torch.__version__}, {args.device}: {where}")
    cases = [("3D", (64, 64, 64), args.items_3d), ("2D", (128, 128), args.items_2d), ("2D", (128, 128), large)]
    with tempfile.TemporaryDirectory() as workdir:
        for name, shape, items in cases:
            if items:
                run_case(name, shape, items, args.samples, Path(workdir), args.device)


if __name__ == "__main__":
    main()
