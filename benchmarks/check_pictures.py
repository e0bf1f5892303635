"""What a check's pictures cost when the PNG file, TensorBoard and W&B share them, as a ratio against each of the
three making its own (as before the pictures were kept on the check), measured in the same run.

A check of a monitor with a ``save_dir``, a TensorBoard logger and a W&B logger shows: the gallery figure (PNG file,
TensorBoard), the histogram figure (TensorBoard, W&B), the gallery rows (W&B table) and the similarities. Only the
making of the pictures is timed, not the writing of event files or W&B records.

    python benchmarks/check_pictures.py [--samples 16] [--gallery 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from relict_callbacks import VoxelLevel
from relict_callbacks.data import make_phantoms
from relict_callbacks.monitor import Monitor
from relict_callbacks.monitor.presentation import Pictures

# what each consumer of a check asks for
WANTED = {"png file": ("gallery_png",), "tensorboard": ("gallery_png", "histograms_png", "similarities"),
          "wandb": ("similarities", "histograms_png", "gallery")}


def show(pictures_for) -> float:
    """Seconds to serve every consumer, ``pictures_for(consumer)`` giving the Pictures it reads."""
    start = time.perf_counter()
    for consumer, wanted in WANTED.items():
        pictures = pictures_for(consumer)
        for name in wanted:
            getattr(pictures, name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--gallery", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for ndim, size in ((2, 64), (3, 48)):
        shape = (1,) + (size,) * ndim
        monitor = Monitor(levels=[VoxelLevel()], num_samples=args.samples, alpha=0.1, gallery_size=args.gallery,
                          progress=False, sampler=lambda model, n, generator: torch.rand(n, *shape,
                                                                                        generator=generator))
        monitor.prepare(make_phantoms(24, ndim=ndim, size=size, seed=0))
        check = monitor.check(None, 0, 10)
        make = lambda: Pictures(monitor.bank, check, args.gallery)  # noqa: E731
        own, shared = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same load
            own.append(show(lambda consumer: make()))
            pictures = make()
            shared.append(show(lambda consumer: pictures))
        ratios = sorted(s / o for s, o in zip(shared, own))
        print(f"{ndim}D {size}^{ndim}, {args.samples} samples, gallery of {args.gallery}: each consumer its own "
              f"{min(own):5.2f} s, shared {min(shared):5.2f} s (fastest of {args.repeats}); shared / own "
              f"{ratios[len(ratios) // 2]:.2f}x (median of the paired runs)")


if __name__ == "__main__":
    main()
